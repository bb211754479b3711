"""The status page and self-service sign-in ([web])."""
