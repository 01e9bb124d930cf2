"""lemur-agent-server: an MCP tool server for LLM agents that design neural networks."""

__version__ = "0.1.0"
