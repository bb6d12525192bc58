"""coserve HTTP front end: OpenAI-compatible routes in front of the engine process."""
