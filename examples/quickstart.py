"""Load a model, ask one question, print the answer.

python examples/quickstart.py path/to/model "What is 2+2?"
"""

import sys

from smollm3_mlx import Chat, load

model_path = sys.argv[1] if len(sys.argv) > 1 else "HuggingFaceTB/SmolLM3-3B"
question = sys.argv[2] if len(sys.argv) > 2 else "What is 2+2?"

model, _ = load(model_path)
chat = Chat(model, think=False)
print(chat.reply(question))
