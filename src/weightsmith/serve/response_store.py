"""Responses kept for `previous_response_id`, `GET` and `DELETE /v1/responses/{id}`.

OpenAI's Responses API stores each response unless the request says `store: false`, and a
later request continues a conversation by naming the last response instead of resending it.
What is kept per response: its Response object (what `GET` returns) and the conversation it
ended as chat messages (the earlier
turns, this request's input, the answer and its function calls), which a request naming it
continues. A continuation takes its own `instructions` (the previous ones are not carried
over, as OpenAI documents) and the stored conversation's prompt is the same as the one just
answered, so `serve`'s prompt cache prefills only the new input.

Kept in memory, within `serve --response-store-mib` (the JSON size of what is kept), the oldest
dropped first; nothing survives a restart. 0 keeps nothing: `store` is then answered false and
`previous_response_id` refused.

Not here: the route (response_route.py), the request's translation (response_schemas.py).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass
class Stored:
    response: dict[str, Any]
    messages: list[dict[str, Any]]  # the conversation this response ended, without instructions
    size: int


class ResponseStore:
    """Stored responses by id, oldest first, within `budget` bytes of JSON."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.items: OrderedDict[str, Stored] = OrderedDict()
        self.size = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def put(self, response: dict[str, Any], messages: list[dict[str, Any]]) -> bool:
        """Keep a finished response; False when it alone exceeds the budget (not kept)."""
        size = len(json.dumps([response, messages], ensure_ascii=False))
        if size > self.budget:
            return False
        while self.items and self.size + size > self.budget:
            _, old = self.items.popitem(last=False)
            self.size -= old.size
        self.items[response["id"]] = Stored(response, messages, size)
        self.size += size
        return True

    def get(self, response_id: str) -> Stored | None:
        return self.items.get(response_id)

    def delete(self, response_id: str) -> bool:
        stored = self.items.pop(response_id, None)
        if stored is not None:
            self.size -= stored.size
        return stored is not None
