"""The client's half of verified speculation (issue 17; theory in protocol/speculation.py).

Plain sync state per token, driven by the vpcd link and fed by the tunnel:

- `SpeculationCache`: the paths the server taught and where the application is on them. While
  the client holds no lease the card, seen from the application, is freshly reset (every lease
  starts with a cold reset), so the walk starts at the root. An APDU on the path is answered
  from it and *deferred*; the first one off the path (or a power event, or an idle pause) makes
  the link send `LeaseExchange` with every deferred step and the answer already given. The
  server replays them and ends the lease as `card_changed` on any difference, which the link
  shows as a removed card.
- `PrefetchedChain`: within a lease, the GET RESPONSE chain the server already ran. The
  application's next GET RESPONSEs are answered from it only when they are exactly its
  commands. Another GET RESPONSE would meet a card whose chain is already consumed, so it is
  refused (`ChainBroken`: the link removes the card); any other command goes to the card as
  usual (ISO 7816-4 §5.1.3: a command other than GET RESPONSE discards the pending data).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Final

from bridge_client.errors import CardFailure
from protocol.speculation import PathTrie, Step

_INS_GET_RESPONSE: Final = 0xC0


class ChainBroken(CardFailure):
    """The application sent another GET RESPONSE than the one the server already ran."""


class SpeculationCache:
    """One token's taught paths and the application's walk on them; see the module docstring."""

    def __init__(self) -> None:
        self._trie = PathTrie()
        self._next_trie: PathTrie | None = None
        self._position = PathTrie.ROOT
        self._deferred: list[Step] = []
        self._walking = True
        self.hits = 0  # APDUs answered from a taught path

    @property
    def steps(self) -> int:
        return len(self._trie if self._next_trie is None else self._next_trie)

    @property
    def deferred(self) -> int:
        return len(self._deferred)

    def teach(self, paths: Sequence[Sequence[Step]]) -> None:
        """New paths from the server; a walk under way keeps the old ones until it ends."""
        self._next_trie = PathTrie(paths)
        if not self._deferred:
            self.restart()

    def answer(self, command: bytes) -> bytes | None:
        """The taught answer to `command` (deferring it), or None: it must go to the card."""
        if not self._walking:
            return None
        hit = self._trie.answer(self._position, command)
        if hit is None:
            self._walking = False
            return None
        self._position, response = hit
        self._deferred.append((command, response))
        self.hits += 1
        return response

    def take_deferred(self) -> tuple[Step, ...]:
        """The deferred steps, to send with the lease request; the walk ends until `restart`."""
        deferred, self._deferred = tuple(self._deferred), []
        self._walking = False
        return deferred

    def restart(self) -> None:
        """No lease any more: the application's next APDU meets a freshly reset card."""
        if self._next_trie is not None:
            self._trie, self._next_trie = self._next_trie, None
        self._position = PathTrie.ROOT
        self._deferred = []
        self._walking = True


class PrefetchedChain:
    """The GET RESPONSE chain the server ran ahead of the application; see the module docstring."""

    def __init__(self) -> None:
        self._steps: deque[Step] = deque()
        self.hits = 0

    def load(self, steps: Sequence[Step]) -> None:
        self._steps = deque(steps)

    def clear(self) -> None:
        self._steps.clear()

    def answer(self, command: bytes) -> bytes | None:
        """The card's answer already fetched for `command`, or None: send it to the card.

        Raises ChainBroken for a GET RESPONSE other than the next one fetched.
        """
        if not self._steps:
            return None
        expected, response = self._steps.popleft()
        if command == expected:
            self.hits += 1
            return response
        self._steps.clear()
        if len(command) >= 2 and command[1] == _INS_GET_RESPONSE:
            raise ChainBroken("the application asked for another GET RESPONSE than the card already answered")
        return None
