"""Which experts a call fuses: the task router, expert cards, task arithmetic (weight composition),
chat rendering and the client that the LangChain and LlamaIndex adapters share."""
