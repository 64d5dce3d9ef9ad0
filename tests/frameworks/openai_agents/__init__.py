"""openai-agents-python's session tests, run against ConvstateSession on a private server."""
