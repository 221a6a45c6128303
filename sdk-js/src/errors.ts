// Errors the SDK raises. `check` names the failed step, with the same names as the Python SDK
// (cocoon_faas/confidential: CheckFailed / EnvelopeError), so a refusal reads the same on both sides.

export class CocoonError extends Error {
  constructor(message: string, readonly status = 0, readonly type = "error", readonly body: unknown = null) {
    super(message);
    this.name = "CocoonError";
  }
}

/** A sealed-call or attestation check failed; nothing was sent (or the answer was refused). */
export class CheckFailed extends CocoonError {
  constructor(readonly check: string, message: string) {
    super(`${check}: ${message}`, 0, "check_failed");
    this.name = "CheckFailed";
  }
}

/** The function itself raised; for sealed calls the message was opened on this device. */
export class FunctionError extends CocoonError {
  constructor(message: string, readonly exceptionType: string, readonly receipt: unknown = null) {
    super(message, 500, "function_error");
    this.name = "FunctionError";
  }
}
