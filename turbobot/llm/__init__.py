"""The LLM layer: a protocol, the OpenAI-compatible client, a scripted fake, tools."""
