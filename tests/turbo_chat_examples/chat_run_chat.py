from turbobot import run_chat
from turbobot.memory import Memory
from turbobot.cache import Cache

memory = Memory()
cache = Cache()

# User input
user_message = "What's the weather like today?"

# Add user message to memory
memory.append(user_message)

# Get AI assistant's response
assistant_response = await run_chat(memory, cache)

print(assistant_response.content)
