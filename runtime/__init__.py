"""Worker-node side: replica actors, the executor, the attestation agent, the provider node agent."""
