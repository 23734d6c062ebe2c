"""The agentic brain: a READ-ONLY decision pipeline, insights and the chat assistant."""
