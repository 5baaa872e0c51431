"""The scripted UI user's plans, without an X server: what it types when the entry has the focus."""

from __future__ import annotations

from gen_lightning.actions import KEYS
from gen_lightning.data import ui_app
from gen_lightning.data.ui_policy import WORDS, ScriptedPolicy

FOCUSED = {
    "menu_open": False,
    "entry_focused": True,
    "boxes": {name: (x, y, x + w, y + h) for name, (x, y, w, h) in ui_app.LAYOUT.items()},
}


def typed_keys(seed: int, steps: int = 3000) -> list[str]:
    policy, keys = ScriptedPolicy(seed), []
    for _ in range(steps):
        step = policy.next_step(FOCUSED, (64, 100))
        if step.kind == "key" and step.target == "entry":  # (stray keys, target None, are another goal)
            assert step.key in KEYS
            keys.append(step.key)
    return keys


def test_typing_spells_words_and_still_covers_every_letter():
    keys = typed_keys(seed=0)
    letters = "".join(key if len(key) == 1 else " " for key in keys)
    # Uniform random letters would spell a 4+ letter word of the list almost never; the user types them in order.
    spelled = sum(letters.count(word) for word in WORDS if len(word) >= 4)
    assert spelled >= 20, letters[:200]
    assert set("abcdefghijklmnopqrstuvwxyz") <= set(letters)  # stray letters keep the whole alphabet in the data
    assert {"space", "BackSpace", "Return"} <= set(keys)
    assert keys == typed_keys(seed=0) and keys != typed_keys(seed=1)
