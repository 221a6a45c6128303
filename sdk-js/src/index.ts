export * from "./bytes.js";
export * from "./errors.js";
export * from "./envelope.js";
export * from "./document.js";
export * from "./tdx.js";
export * from "./payments.js";
export * from "./client.js";
