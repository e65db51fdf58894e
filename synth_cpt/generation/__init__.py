"""LLM generation: one engine over vLLM (in process) or OpenAI-compatible servers, with a
content-addressed, crash-safe cache so nothing is ever generated twice."""
