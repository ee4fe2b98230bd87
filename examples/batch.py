"""Several questions answered together in one batch: an evaluation, or an app with many chats.

    python examples/batch.py path/to/model "What is 2+2?" "Say hi."

Each answer is the one it would be alone (greedy here: token for token); the batch runs one
forward pass per step for all of them. Answers print as each one ends.
"""

import sys

from smollm3_mlx import Sampling, load, stream_batch


def main(model_path: str, questions: list[str]) -> None:
    model, tokenizer = load(model_path)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=True, enable_thinking=False
        )
        for q in questions
    ]
    answers = [""] * len(questions)
    greedy = Sampling(temperature=0, max_tokens=256)
    for i, response in stream_batch(model, tokenizer, prompts, sampling=greedy):
        answers[i] += response.text
        if response.finish_reason is not None:
            print(f"> {questions[i]}\n{answers[i]}\n[{response.generation_tokens} tokens]")


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "HuggingFaceTB/SmolLM3-3B"
    main(path, sys.argv[2:] or ["What is 2+2?", "Say hi."])
