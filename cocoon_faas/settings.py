"""The one settings class: environment (prefix ``COCOON_``) > ``$COCOON_HOME/config.env`` > defaults."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_home() -> Path:
    return Path(os.environ.get("COCOON_HOME") or Path.home() / ".cocoon")


class Settings(BaseSettings):
    """Every knob of the platform, read once at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="COCOON_", env_file=str(_default_home() / "config.env"), extra="ignore"
    )

    home: Path = Field(default_factory=_default_home, description="state directory (keys, SQLite, wallets)")
    gateway_url: str = Field("http://127.0.0.1:8000", description="where the CLI and SDK reach the gateway "
                             "(several gateways: url1,url2; calls move on to the next when one is down)")
    api_key: str | None = Field(None, description="API key; default: the key file under home")

    models_dir: Path | None = Field(None, description="converted model weights cache (default: home/models)")
    llm_threads: int = Field(0, ge=0, description="cores of an LLM engine replica: on CPU the C kernels split "
                             "each GEMM and attention over this many threads (with fp32 weights each step's "
                             "sequences split over them); on a GPU torch's thread count (0: leave torch's default, "
                             "one thread per CPU the function declares)")
    llm_precision: Literal["auto", "gguf", "q8", "q4", "fp32", "fp16", "bf16"] = Field(
        "auto", description="weights of an LLM replica: as the GGUF stores them, requantized, or a float type; "
        "auto: fp32 for now (why: kernels/models/smollm.py)")

    # gateway
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535, description="the port the gateway listens on")
    ray_address: str | None = Field(None, description="join this Ray cluster instead of starting a local one")
    ray_loopback_only: bool = Field(True, description="the embedded Ray listens on 127.0.0.1 only; false: Ray's "
                                    "default (the machine's address, every interface), so provider nodes can join")
    ray_num_cpus: int = Field(16, description="logical CPUs the embedded local Ray advertises")
    replica_host: str = Field("127.0.0.1", description="address replicas bind their data-path port to")
    dashboard_hosts: str = Field("", description="host[:port] names clients reach this gateway by, comma-separated "
                                 "(e.g. faas.example.com): a provider's dashboard login signed for another name is "
                                 "refused; empty: the request's Host header is the name")
    max_body_bytes: int = Field(10 * 1024 * 1024, description="largest accepted request body")
    queue_limit: int = Field(256, description="calls allowed to wait per function when every replica is busy")
    result_ttl_s: float = Field(3600.0, description="how long async call results are kept")
    engine_target_utilization: float = Field(
        0.8, gt=0, le=1, description="engine-backed functions scale to keep each replica's engine at most this busy "
        "(the fuller of its batch and KV pool; a queue in the engine counts as over 1)")
    scale_up_delay_s: float = Field(0.25, description="sustained overload (calls queued) before adding replicas")
    scale_down_delay_s: float = Field(30.0, description="sustained underload before removing replicas")
    idle_timeout_s: float = Field(300.0, description="idle time before a min_replicas=0 function scales to zero")
    replica_start_timeout_s: float = Field(120.0, description="time a replica may take to start")
    drain_timeout_s: float = Field(60.0, description="time old replicas get to finish calls on redeploy")
    provider_heartbeat_s: float = Field(5.0, description="provider heartbeat interval; 3 missed = down")
    provider_sync_s: float = Field(1.0, gt=0, description="how often a gateway reads the provider nodes changed "
                                   "on any gateway: the bound on how stale its view of them is")
    provider_full_sync_s: float = Field(30.0, gt=0, description="how often a gateway reads every provider node "
                                        "(heartbeat times, other gateways' call totals, expired rows)")
    attestation: str = Field("auto", description="replica TEE evidence: auto (tdx with configfs-tsm, else dev), "
                             "tdx, dev")
    max_frame_bytes: int = Field(16 * 1024 * 1024, description="largest frame a replica may send the gateway")
    stream_window_bytes: int = Field(1024 * 1024, ge=4096, le=1 << 40, description="per stream, the bytes of "
                                     "items a replica may send ahead of what the client has read (each item "
                                     "counts 512 bytes more); the gateway holds at most this plus one item per "
                                     "stream, and a slow client pauses the function's generator")
    direct_calls: bool = Field(True, description="plain (unsealed) calls go from the gateway straight to the "
                               "replica's sandboxed process over a connection the replica actor authenticates and "
                               "hands over, skipping the actor's hop (docs/security.md, \"The direct path\"); "
                               "off: every call crosses the actor")
    stream_stall_s: float = Field(60.0, ge=1, le=86400, description="a stream whose client takes no bytes for "
                                  "this long (its socket full, the call's items waiting) is cut: the function's "
                                  "generator stops, its replica slot and any hold are freed as for a client that "
                                  "left; a client merely reading slowly is never cut")
    interrupt_grace_s: float = Field(10.0, gt=0, le=3600, description="a call still running this long after it "
                                     "had to stop (its time limit, a cancel, its client gone: it caught the "
                                     "interrupt, sits in one long C call or blocks its event loop) ends its sandbox "
                                     "process, and the replica is replaced")
    max_connections: int = Field(2048, description="open HTTP connections the gateway serves at once "
                                 "(more get 503 from uvicorn)")
    max_header_bytes: int = Field(64 * 1024, description="largest total size of a request's headers (431 above)")

    # providers (see docs/security.md, "Providers and the operator")
    provider_admission: str = Field("auto", description="who may join the Ray cluster as a provider: attested "
                                    "(TEE evidence of the measured worker), approved (`cocoon provider approve "
                                    "WALLET`), open (loopback development only); auto: attested unless the "
                                    "gateway listens on loopback only, then open")
    provider_dev_keys: str = Field("", description="comma-separated development attestation keys (hex) whose "
                                   "provider nodes attested mode admits: NOT SECURE, for machines without a TEE")
    provider_measurements: str = Field("", description="comma-separated worker measurements attested mode "
                                       "accepts (default: this gateway's own worker code)")
    max_price_nanoton: int = Field(10**10, ge=0, description="highest price per GPU- or CPU-second a provider may ask")
    provider_expiry_s: float = Field(3600.0, description="a provider node down this long is forgotten (joins "
                                     "again as new)")

    # quotas and retention
    max_functions_per_developer: int = Field(200, description="functions one developer may have deployed")
    max_versions_kept: int = Field(20, description="versions kept per function (older, non-current ones pruned)")
    max_replicas_per_developer: int = Field(1000, description="max_replicas summed over one developer's functions")
    call_retention_s: float = Field(7 * 86400.0, description="how long call records are kept")
    log_retention_s: float = Field(7 * 86400.0, description="how long function logs are kept")
    max_log_rows_per_function: int = Field(100_000, description="log lines kept per function (oldest dropped)")
    max_pending_async_calls: int = Field(10_000, description="async calls queued or running at once")
    hold_grace_s: float = Field(60.0, ge=0, description="a paid call's hold left held this long past its function's "
                                "time limit is released by the sweeper")
    hold_sweep_interval_s: float = Field(30.0, gt=0, description="how often the holds sweeper runs")
    sandbox: str = Field("on", description="'on': tenant code runs in a bubblewrap sandbox (needs `bwrap`); 'off': "
                         "no sandbox, for development on machines without user namespaces only")
    capture_forwarded: Path | None = Field(None, description="audit/test aid: append every sealed body the "
                                           "gateway forwards (both directions) to this file")

    # several gateways (README "Running more than one gateway")
    database_url: str | None = Field(None, description="postgresql://user@host/db: state shared by several "
                                     "gateways (default: SQLite files under home)")
    db_pool_size: int = Field(8, description="PostgreSQL connections per gateway process")
    workers: int = Field(1, description="gateway processes sharing the port on this machine (`serve --workers`)")
    gateway_lease_s: float = Field(10.0, description="a gateway silent this long is presumed dead: its leadership, "
                                   "async calls and payment holds pass to the others")

    # payments
    payments_required: bool = Field(False, description="refuse unpaid /fn calls even with an API key (402)")
    operator_fee_bps: int = Field(500, ge=0, le=10_000,
                                  description="operator fee in basis points of provider pay + royalty")
    cpu_price_nanoton: int = Field(1_000, ge=0, description="local provider price, nanoton per CPU-second")
    gpu_price_nanoton: int = Field(100_000, ge=0, description="local provider price, nanoton per GPU-second")
    settlement: str = Field("local", description="settlement backend: 'local' (SQLite dev chain) or 'ton'")
    chain_path: Path | None = Field(None, description="the local chain's SQLite file; default home/chain.db "
                                    "(a caller on another home points this at the gateway's)")
    ton_network: str = Field("testnet", description="'testnet' or 'mainnet' for the 'ton' backend")
    ton_config: Path | None = Field(None, description="TON global config JSON for the 'ton' backend (pytonlib)")
    channel_quarantine_s: int = Field(86_400, ge=0, description="operator: the dispute window of new channels (a "
                                      "forced close waits this long; the watchtower challenges within it)")
    channel_conditional_close_s: int = Field(0, ge=0, description="operator: the contract's conditional-payment "
                                             "window after the quarantine (Cocoon sends none)")
    channel_fine_bps: int = Field(1000, ge=0, le=2500, description="operator: misbehaviour fine of new channels, "
                                  "basis points of the deposit")
    channel_max_close_s: int = Field(7 * 86_400, ge=1, description="caller: the longest forced close (quarantine + "
                                     "conditional window) it accepts before funding a channel")
    watchtower_interval_s: float = Field(10.0, gt=0, description="how often the gateway checks its channels on chain")

    @field_validator("provider_admission")
    @classmethod
    def _admission(cls, v: str) -> str:
        if v not in ("auto", "attested", "approved", "open"):
            raise ValueError(f"COCOON_PROVIDER_ADMISSION must be attested, approved, open or auto; got {v!r}")
        return v

    @field_validator("gateway_url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        urls = [u.strip().rstrip("/") for u in v.split(",") if u.strip()]  # several gateways: url1,url2
        for u in urls or [v]:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"COCOON_GATEWAY_URL must start with http:// or https:// (several: "
                                 f"url1,url2), got {u!r}")
            try:
                parts = urlsplit(u)
                bad = not parts.hostname or parts.port == 0
            except ValueError:  # "http://[::1", "http://host:port"
                bad = True
            if bad:
                raise ValueError(f"COCOON_GATEWAY_URL {u!r} is not a host and port; write it like "
                                 "http://127.0.0.1:8000")
        return ",".join(urls)

    @field_validator("database_url")
    @classmethod
    def _db_url(cls, v: str | None) -> str | None:
        if v and not v.startswith(("postgresql://", "postgres://", "sqlite:///")):
            raise ValueError(f"COCOON_DATABASE_URL must start with postgresql:// (or sqlite:///), got "
                             f"{v.split('://')[0]}://…")
        return v or None
    @field_validator("sandbox")
    @classmethod
    def _sandbox_mode(cls, v: str) -> str:
        v = v.strip().lower()
        if v not in ("on", "off"):
            raise ValueError(f"COCOON_SANDBOX must be 'on' or 'off', got {v!r}")
        return v

    @property
    def db_path(self) -> Path:
        return self.home / "cocoon.db"

    @property
    def key_file(self) -> Path:
        return self.home / "api_key"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()


def reload_settings() -> Settings:
    """Forget the cached settings (tests and `cocoon serve` flags call this)."""
    get_settings.cache_clear()
    return get_settings()
