"""The Starlette gateway."""
