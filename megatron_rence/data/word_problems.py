"""Easy one-step arithmetic word problems with exact integer answers (the real-model CPU recipe's task).

    >>> import random
    >>> word_problem(random.Random(3), "+", 2, 9)
    ('Ben picked 5 coins in the morning and 4 coins in the afternoon. How many coins did Ben pick in all?', '9')

One operation per problem, chosen from `data.synthetic.operators` ("+", "-", "*"); both numbers are drawn
from [min_value, max_value]; subtraction never goes below zero (the larger number comes first).
"""
from __future__ import annotations

import random

NAMES = [("Mia", "She"), ("Noah", "He"), ("Lena", "She"), ("Omar", "He"), ("Sara", "She"), ("Ben", "He"),
         ("Ava", "She"), ("Leo", "He"), ("Zoe", "She"), ("Sam", "He"), ("Ivy", "She"), ("Max", "He")]
ITEMS = ["apples", "books", "pencils", "stickers", "marbles", "cookies", "cards", "coins", "shells", "stamps"]
TEMPLATES = {
    "+": ["{name} has {a} {item}. {pron} finds {b} more {item}. How many {item} does {name} have now?",
          "There are {a} {item} in a box and {b} {item} on the table. How many {item} are there in total?",
          "{name} picked {a} {item} in the morning and {b} {item} in the afternoon. How many {item} did {name} "
          "pick in all?"],
    "-": ["{name} has {a} {item}. {pron} gives {b} {item} to a friend. How many {item} does {name} have left?",
          "A shelf holds {a} {item}. {b} of them are taken away. How many {item} are left on the shelf?",
          "{name} had {a} {item} and lost {b} of them. How many {item} does {name} have now?"],
    "*": ["{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} buy?",
          "There are {a} rows with {b} {item} in each row. How many {item} are there?"],
}
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def word_problem(rng: random.Random, op: str, min_value: int, max_value: int) -> tuple[str, str]:
    """(problem text, answer) of one problem with operation `op`, drawn from `rng`."""
    a, b = rng.randint(min_value, max_value), rng.randint(min_value, max_value)
    if op == "-" and b > a:
        a, b = b, a
    name, pron = rng.choice(NAMES)
    template = rng.choice(TEMPLATES[op])
    text = template.format(name=name, pron=pron, a=a, b=b, item=rng.choice(ITEMS))
    return text, str(_APPLY[op](a, b))
