"""The tiny-onpolicy recipe's reward, a verifiable one: the reply is checked against the sorted
digits of the prompt; no reward model."""


def sorted_digits(prompt: list[dict], response: str) -> float:
    """1.0 for exactly the sorted digits; otherwise half the share of positions holding the right
    digit (extra or missing digits count as wrong positions), so any exact answer outranks every
    near miss and near misses outrank worse ones."""
    target = sorted(prompt[-1]["content"].removeprefix("Sort:").split())
    reply = response.split()
    if reply == target:
        return 1.0
    right = sum(a == b for a, b in zip(reply, target))
    return 0.5 * right / max(len(target), len(reply))
