"""The Chainlit chat UI: a client of the gateway, with its own users and chat history."""
