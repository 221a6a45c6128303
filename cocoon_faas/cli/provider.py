"""`cocoon provider join | leave | ls | status`: rent this machine's GPUs (or CPUs) to the cluster.

A thin layer over runtime/node_agent.py (join runs the agent in the foreground, like ``ray start --block``) and the
gateway's provider routes (gateway/provider_routes.py). The wallet key signs the registration: by default the
wallet `cocoon wallet create` made (``$COCOON_HOME/wallet.json``), else ``--key-file`` (that JSON, 24 words, or a
64-hex seed). The running node's session (id, token, gateway) is kept in ``$COCOON_HOME/provider.json`` so
``leave`` and ``status`` from another shell find it. ``earnings`` and ``payout`` (the operator's ledger view and
payouts over payment channels) live in cli/pay.py, in the same ``provider`` group.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from cocoon_faas.errors import CocoonError, InvalidRequestError
from cocoon_faas.settings import get_settings
from cocoon_faas.ton.home_files import load_wallet_key


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _session_file() -> Path:
    return get_settings().home / "provider.json"


def _session() -> dict[str, Any]:
    f = _session_file()
    if not f.exists():
        raise InvalidRequestError(f"no provider node runs from this machine ({f} is missing); "
                                  "start one with `cocoon provider join`")
    try:
        s = json.loads(f.read_text())
        if not isinstance(s, dict) or not all(isinstance(s.get(k), str) for k in ("gateway", "node_id", "token")):
            raise ValueError
    except (OSError, ValueError):
        raise InvalidRequestError(f"{f} is damaged; stop the node's `cocoon provider join` if it still runs, "
                                  "delete the file and join again") from None
    return s


def _running_node() -> tuple[str, int] | None:
    """(node id, pid) of the `cocoon provider join` still running from this home, if any."""
    try:
        s = json.loads(_session_file().read_text())
        pid = int(s["pid"])
        if pid <= 0 or pid == os.getpid():
            return None
        os.kill(pid, 0)  # raises when no such process
        return str(s["node_id"]), pid
    except (OSError, ValueError, KeyError, TypeError):  # none, gone, or a file no join of ours wrote
        return None


def _link(gateway: str | None) -> Any:
    from cocoon_faas.runtime.node_agent import GatewayLink
    from cocoon_faas.transport import gateway_urls

    return GatewayLink(gateway or gateway_urls(get_settings().gateway_url)[0])  # a node registers with one


def _operator_link(gateway: str | None) -> Any:
    """A link that carries the operator's API key (COCOON_API_KEY, else the key file `cocoon serve` wrote)."""
    import httpx

    from cocoon_faas.runtime.node_agent import GatewayLink

    s = get_settings()
    key = s.api_key or (s.key_file.read_text().strip() if s.key_file.exists() else "")
    if not key:
        raise click.UsageError("no API key: run this on the gateway machine (it reads $COCOON_HOME/api_key) or "
                               "set COCOON_API_KEY to the operator's key")
    return GatewayLink(gateway or s.gateway_url,
                       client=httpx.Client(timeout=10.0, headers={"authorization": f"Bearer {key}"}))


def _gpus_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from cocoon_faas.runtime.hardware import parse_gpus_flag

    if value is not None:
        try:
            parse_gpus_flag(value)
        except InvalidRequestError as exc:
            raise click.BadParameter(exc.message) from None
    return value


def _price_option(ctx: click.Context, param: click.Parameter, value: str) -> int:
    from cocoon_faas.gateway.marketplace import ton_to_nanoton

    try:
        return ton_to_nanoton(value)
    except InvalidRequestError as exc:
        raise click.BadParameter(exc.message) from None


def _ton(nano: int) -> str:
    from decimal import Decimal

    return f"{Decimal(nano) / Decimal(10**9):f}"


def register(main: click.Group) -> None:
    existing = main.commands.get("provider")  # cli/pay.py adds `earnings` and `payout` (operator) to the group
    if isinstance(existing, click.Group):
        provider = existing
        provider.help = "Offer this machine's GPUs to the cluster and earn TON per GPU-second; payouts."
    else:
        @main.group("provider")
        def provider() -> None:
            """Offer this machine's GPUs to the cluster and earn TON per GPU-second."""

    @provider.command("join")
    @click.option("--gateway", default=None, help="gateway URL (default COCOON_GATEWAY_URL)")
    @click.option("--wallet", required=True, help="your TON wallet address (earnings are paid to it)")
    @click.option("--price", required=True, callback=_price_option, help="TON per GPU-second, e.g. 0.0005")
    @click.option("--cpu-price", default="0", show_default=True, callback=_price_option, help="TON per CPU-second")
    @click.option("--gpus", default=None, metavar="MODEL:COUNT", callback=_gpus_option,
                  help="declare GPUs instead of detecting them, e.g. H100:2")
    @click.option("--cpus", default=None, type=int, help="CPUs to offer (default: all)")
    @click.option("--name", default=None, help="node name (default: host name; keeps the node id across joins)")
    @click.option("--key-file", default=None, type=click.Path(dir_okay=False, path_type=Path),
                  help="wallet key (default $COCOON_HOME/wallet.json)")
    @click.option("--wallet-version", default="v3r2", show_default=True, help="the wallet contract version")
    @click.option("--temp-dir", default=None, help="Ray's --temp-dir for this node")
    @click.option("--object-store-memory", default=None, type=int, help="Ray object store size in bytes")
    @click.option("--ray-arg", "ray_args", multiple=True, metavar="ARG",
                  help="extra `ray start` argument, repeatable, e.g. --ray-arg=--node-manager-port=6380 "
                       "(several nodes on one machine need distinct ports)")
    @click.option("--attestation", type=click.Choice(["auto", "tdx", "dev", "none"]), default="auto",
                  show_default=True, help="evidence that this node runs the platform's worker: tdx (a TDX "
                  "quote), dev (a local development key; NOT SECURE, admitted only where the operator trusts "
                  "it), none; auto: tdx when this machine is a TDX guest, else dev")
    def join(gateway: str | None, wallet: str, price: int, cpu_price: int, gpus: str | None, cpus: int | None,
             name: str | None, key_file: Path | None, wallet_version: str, temp_dir: str | None,
             object_store_memory: int | None, ray_args: tuple[str, ...], attestation: str) -> None:
        """Detect the hardware, register (signed by the wallet key), join Ray, heartbeat until stopped."""
        from cocoon_faas.runtime import hardware
        from cocoon_faas.runtime.node_agent import NodeAgent
        from cocoon_faas.runtime.registration import wallet_owner_matches

        try:
            running = _running_node()
            if running is not None:  # a second join would take over its registration and clash with its Ray
                raise InvalidRequestError(f"node {running[0]} already runs from this COCOON_HOME (pid {running[1]}); "
                                          "stop it first (`cocoon provider leave`), or join from another "
                                          "COCOON_HOME")
            key = load_wallet_key(key_file or get_settings().home / "wallet.json")
            if not wallet_owner_matches(wallet, key.public_key().to_bytes(), wallet_version):
                raise InvalidRequestError(f"this key does not own {wallet} as a {wallet_version} wallet; pass the "
                                          "wallet's own key with --key-file or its version with --wallet-version")
            hw = hardware.detect(gpus, cpus=cpus)
            if attestation == "auto":
                from cocoon_faas.confidential.replica import TSM_REPORT_DIR

                attestation = "tdx" if TSM_REPORT_DIR.is_dir() else "dev"
            agent = NodeAgent(_link(gateway), key, wallet=wallet, hardware=hw, gpu_price=price,
                              cpu_price=cpu_price, wallet_version=wallet_version, name=name,
                              temp_dir=temp_dir, object_store_memory=object_store_memory, ray_args=ray_args,
                              attestation=None if attestation == "none" else attestation,
                              home=get_settings().home)
            info = agent.register()
        except CocoonError as exc:
            _fail(exc.message)
            return
        f = _session_file()
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"node_id": info.node_id, "token": info.token, "gateway": agent.link.url,
                                 "pid": os.getpid()}))
        os.chmod(f, 0o600)
        click.echo(json.dumps({"node_id": info.node_id, "hardware": hw.label, "ray_address": info.ray_address,
                               "resources": info.resources, "price_ton_per_gpu_s": _ton(price)}, indent=2))

        def on_signal(signum: int, frame: Any) -> None:
            click.echo("leaving: draining in-flight calls…", err=True)
            agent.leave()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        log = Path(temp_dir or get_settings().home) / f"ray-node-{info.node_id}.log"
        agent.start_ray(log)
        try:
            status = agent.run()
        finally:
            agent.stop_ray()
            if f.exists() and json.loads(f.read_text()).get("pid") == os.getpid():
                f.unlink()
        if status == "ray-died":
            _fail(f"the Ray node stopped (see {log}); run `cocoon provider join` again")
        click.echo(json.dumps({"node_id": info.node_id, "status": status}))

    @provider.command("leave")
    @click.option("--timeout", default=300.0, show_default=True, help="seconds to wait for in-flight calls")
    def leave(timeout: float) -> None:
        """Drain this machine's node (replicas move, calls finish), then the running `join` stops Ray."""
        try:
            s = _session()
            link = _link(s["gateway"])
            ans = link.call("POST", f"/v1/providers/{s['node_id']}/leave", token=s["token"])
            deadline = time.monotonic() + timeout
            status = ans["status"]
            while status not in ("left", "down") and time.monotonic() < deadline:
                time.sleep(0.5)
                status = link.call("GET", f"/v1/providers/{s['node_id']}")["status"]
        except CocoonError as exc:
            if exc.status == 404:
                status = "left"
            else:
                _fail(exc.message)
                return
        if status not in ("left", "down"):
            _fail(f"node still {status} after {timeout:g}s; run `cocoon provider leave` again to keep waiting")
        click.echo(json.dumps({"node_id": s["node_id"], "status": status}))

    @provider.command("approve")
    @click.argument("wallet")
    @click.option("--gateway", default=None, help="gateway URL (default COCOON_GATEWAY_URL)")
    def approve(wallet: str, gateway: str | None) -> None:
        """Operator: let WALLET's nodes join (COCOON_PROVIDER_ADMISSION=approved)."""
        try:
            out = _operator_link(gateway).call("POST", "/v1/providers/approvals", body={"wallet": wallet})
        except CocoonError as exc:
            _fail(exc.message)
            return
        click.echo(json.dumps(out))

    @provider.command("revoke")
    @click.argument("wallet")
    @click.option("--gateway", default=None, help="gateway URL (default COCOON_GATEWAY_URL)")
    def revoke(wallet: str, gateway: str | None) -> None:
        """Operator: refuse WALLET from now on, in every admission mode; its nodes leave placement at once."""
        from urllib.parse import quote

        try:
            out = _operator_link(gateway).call("DELETE", f"/v1/providers/approvals/{quote(wallet, safe='')}")
        except CocoonError as exc:
            _fail(exc.message)
            return
        click.echo(json.dumps(out))

    @provider.command("login")
    @click.option("--gateway", default=None, help="gateway URL (default COCOON_GATEWAY_URL)")
    @click.option("--wallet", default=None, help="your wallet address (default: the key's own wallet)")
    @click.option("--key-file", default=None, type=click.Path(dir_okay=False, path_type=Path),
                  help="wallet key (default $COCOON_HOME/wallet.json)")
    @click.option("--wallet-version", default="v3r2", show_default=True, help="the wallet contract version")
    @click.option("--open", "open_browser", is_flag=True, help="open the link in this machine's browser")
    @click.option("--json", "as_json", is_flag=True, help="print JSON (link, code, expiry)")
    def login(gateway: str | None, wallet: str | None, key_file: Path | None, wallet_version: str,
              open_browser: bool, as_json: bool) -> None:
        """A one-time link to the dashboard's provider view: your nodes, earnings and payouts (signed here by the
        wallet key your nodes joined with; the key never leaves this machine)."""
        import httpx

        from cocoon_faas.gateway.dashboard_login import ProviderLogin
        from cocoon_faas.ton.wallet import Wallet
        from cocoon_faas.transport import gateway_urls

        url = gateway or gateway_urls(get_settings().gateway_url)[0]
        try:
            key = load_wallet_key(key_file or get_settings().home / "wallet.json")
            pub = key.public_key()
            link = _link(url)
            challenge = link.call("POST", "/dashboard/api/provider/challenge")["challenge"]
            proof = ProviderLogin(challenge, httpx.URL(link.url).netloc.decode(),
                                  wallet or Wallet(pub, version=wallet_version).address.friendly(), wallet_version,
                                  pub.to_bytes().hex())
            out = link.call("POST", "/dashboard/api/provider/login", body=proof.signed(key))
        except CocoonError as exc:
            _fail(exc.message)
            return
        if as_json:
            click.echo(json.dumps(out, indent=2))
        else:
            click.echo(f"Open within {out['expires_in']} s (the link works once):\n  {out['url']}\n"
                       f"or paste this code on the dashboard's login page: {out['code']}")
        if open_browser:
            import webbrowser

            webbrowser.open(out["url"])

    @provider.command("ls")
    @click.option("--gateway", default=None, help="gateway URL (default COCOON_GATEWAY_URL)")
    @click.option("--json", "as_json", is_flag=True, help="print JSON")
    def ls(gateway: str | None, as_json: bool) -> None:
        """Every provider node: hardware, price, load, health, success rate, latency, earnings."""
        try:
            rows = _link(gateway).call("GET", "/v1/providers")["providers"]
        except CocoonError as exc:
            _fail(exc.message)
            return
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        def cell(v: object) -> Text:  # a node's own words (its name): as plain text, never markup or escapes
            return Text("".join(c if c.isprintable() else "?" for c in str(v)))

        t = Table("node", "name", "gpu", "TON/GPU-s", "status", "load", "replicas", "success", "latency",
                  "calls", "earned TON")
        for r in rows:
            t.add_row(*map(cell, (r["node_id"], r["name"], r["gpu"], _ton(r["gpu_price"]),
                      (f"excluded: {r['excluded']}" if r.get("excluded") else
                       r["status"] + ("" if r["healthy"] or r["status"] != "up" else " (silent)")),
                      f"{r['load']:.2f}", str(r["replicas"]), f"{r['success_rate']:.1%}",
                      f"{r['mean_latency_s'] * 1000:.0f} ms", str(r["calls"]), _ton(r["earned"]))))
        Console(width=None if sys.stdout.isatty() else 200).print(t)

    @provider.command("status")
    def status() -> None:
        """This machine's node as the gateway sees it: health, load, calls and earnings so far."""
        try:
            s = _session()
            row = _link(s["gateway"]).call("GET", f"/v1/providers/{s['node_id']}")
        except CocoonError as exc:
            _fail(exc.message)
            return
        click.echo(json.dumps({**{k: row[k] for k in ("node_id", "status", "healthy", "gpu", "load", "replicas",
                                                      "calls", "success_rate", "mean_latency_s")},
                               "earned_nanoton": row["earned"], "earned_ton": _ton(row["earned"])}, indent=2))
