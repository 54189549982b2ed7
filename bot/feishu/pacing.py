"""How often a streaming card is updated: a bounded number of calls per answer, whatever its length.

Every CardKit update is one Open API call, and free Feishu tenants have a monthly call quota. A
fixed interval makes the calls grow with the answer's length (0.3 s: about 200 calls a minute).
`Pacing` spaces the updates further apart as the answer goes on: the gap before update *n*
(0-based) is ``interval * growth ** n``, and after `max_updates` updates the card waits for its
final text. The first words still appear after `interval`; later ones in growing steps.

With the defaults (0.3 s, growth 1.3, 20 updates) the updates happen at about 0.3, 0.7, 1.2,
1.9, 2.7, 3.8 ... s; a 10 s answer makes 9 updates, a 60 s one 15, and no answer more than 20.
Pure arithmetic, no clock: the card's pump asks `delay` and keeps the time itself.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Pacing:
    interval: float = 0.3  # seconds before the first update (and the base of the others)
    growth: float = 1.3  # each gap is this much longer than the one before
    max_updates: int = 20  # content updates per card at most; the final text is sent apart

    def delay(self, sent: int) -> float | None:
        """Seconds to wait after the previous update before update number *sent* (0-based),
        or None when the card has had its `max_updates` and waits for the final text."""
        if sent >= self.max_updates:
            return None
        return self.interval * self.growth**sent

    def updates_within(self, seconds: float) -> int:
        """How many updates a stream that produces text for *seconds* makes at most."""
        count, at = 0, 0.0
        while True:
            gap = self.delay(count)
            if gap is None or at + gap > seconds:
                return count
            at += gap
            count += 1
