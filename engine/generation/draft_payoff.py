"""When drafting pays: each speculating request's payoff, estimated online from what decoding measures as it runs.

A step that verifies k draft tokens, each kept with probability a (until the first rejection), gives on average
1 + a + ... + a^k tokens instead of one, and costs k more rows in the batch's forward pass plus the draft's forward
passes (none for prompt lookup). Both sides move: a with the text (a passage being quoted, a story the draft model
knows well), the costs with the machine's load, the batch and the kernels. So both are measured while decoding runs —
the acceptance per request (recent steps weigh most, the draft's long-run rate is the prior), the seconds of every
forward pass by its row count (a table per model, see CostTable) — and every step takes the draft length k in 0..N
that gives the batch the most expected tokens per second, k = 0 being plain decoding. Verification is exact, so the
choice changes the speed only, never the tokens.

While plain decoding wins, the draft source probes now and then (one drafting step after 8 plain decisions, then
after 16, 32, ... up to 128, and only once 2% of the plain steps' seconds since the last probe pay for the probe's
extra cost; the counts are shared by the requests drafting from it, across generations) so that a text that turns
repetitive, or a lighter load, is noticed. A draft model that sat out must first catch up on the
tokens it has not seen (one forward pass over them): the decision to resume counts that cost, and a probe is skipped
where drafting could not pay even with half the rejections, that cost counted (a draft model too slow for this
machine is then not run again in this process).
TINYLLAMA_DRAFT_ALWAYS=1 turns the estimate off (every step drafts the most it may). docs/speculation.md has the
rule, its measurements and what `usage` reports.
"""
from __future__ import annotations

import os
import weakref

_FORWARD_COSTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its CostTable
_LOOKUP_SOURCES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> prompt lookup's DraftSource


class Pace:
    """How slow the machine runs now, as a factor shared by every CostTable of the process: each measurement of a row
    count measured before moves it by how far it is from that count's running mean, so a cost measured minutes ago
    (under another load) is scaled to the load of now before it is compared with one measured this step."""

    WEIGHT = 0.5

    def __init__(self):
        self.value = 1.0

    def update(self, measured: float, predicted: float) -> None:
        """Move the pace towards measured / predicted (clipped to [0.5, 2]: one descheduled pass is not a trend)."""
        self.value *= min(2.0, max(0.5, measured / predicted)) ** self.WEIGHT


MACHINE_PACE = Pace()


class CostTable:
    """The seconds of one model's forward pass by its number of rows: a running mean per row count (in units of the
    shared Pace), read back for any row count by linear interpolation over the measured ones, never decreasing with
    the rows. With a single row count measured, each further row is taken to cost PRIOR_ROW_SHARE of it."""

    WEIGHT = 0.1  # of each new measurement in its row count's mean (after the first ten: their plain mean before)
    PRIOR_ROW_SHARE = 0.1
    FRESH_PASSES = 64  # a row count measured within this many passes of the table is fresh

    def __init__(self, pace: Pace | None = None):
        self.pace = pace if pace is not None else MACHINE_PACE
        self.passes = 0
        self._mean: dict[int, float] = {}  # rows -> seconds / pace
        self._count: dict[int, int] = {}  # rows -> measurements
        self._when: dict[int, int] = {}  # rows -> the pass that last measured it

    @classmethod
    def of(cls, model) -> "CostTable":
        """The table of `model`'s forward passes (one per model object, kept while it lives)."""
        table = _FORWARD_COSTS.get(model)
        if table is None:
            table = _FORWARD_COSTS[model] = cls()
        return table

    def add(self, rows: int, seconds: float) -> None:
        """Record a forward pass of `rows` rows that took `seconds`."""
        if rows < 1 or seconds <= 0:
            return
        self.passes += 1
        old = self._mean.get(rows)
        if old is not None:  # the same pass measured again: how much slower the machine runs now
            self.pace.update(seconds, old * self.pace.value)
        value = seconds / self.pace.value
        n = self._count[rows] = self._count.get(rows, 0) + 1
        self._mean[rows] = value if old is None else old + max(self.WEIGHT, 1 / n) * (min(2 * old, max(old / 2, value))
                                                                                        - old)
        self._when[rows] = self.passes

    def fresh(self, rows: int) -> bool:
        """Whether `rows` itself was measured within the last FRESH_PASSES passes."""
        return rows in self._when and self.passes - self._when[rows] <= self.FRESH_PASSES

    @property
    def empty(self) -> bool:
        """Whether nothing has been measured yet."""
        return not self._mean

    def seconds(self, rows: int) -> float | None:
        """Expected seconds of a pass of `rows` rows now (None before any measurement)."""
        if not self._mean:
            return None
        keys = sorted(self._mean)
        values, top = [], 0.0
        for k in keys:  # a pass of more rows never costs less: the running maximum
            top = max(top, self._mean[k])
            values.append(top)
        if rows in self._mean:
            return values[keys.index(rows)] * self.pace.value
        below = [i for i, k in enumerate(keys) if k < rows]
        above = [i for i, k in enumerate(keys) if k > rows]
        if below and above:
            i, j = below[-1], above[0]
            share = (rows - keys[i]) / (keys[j] - keys[i])
            value = values[i] + share * (values[j] - values[i])
        elif below and len(keys) >= 2:
            i, j = below[-2], below[-1]
            slope = max(0.0, (values[j] - values[i]) / (keys[j] - keys[i]))
            value = values[j] + slope * (rows - keys[j])
        else:  # one row count measured (or only larger ones): the prior per-row share
            k = keys[below[-1]] if below else keys[0]
            value = values[keys.index(k)] * (1 + self.PRIOR_ROW_SHARE * (rows - 1)) / (1 + self.PRIOR_ROW_SHARE * (k - 1))
        return value * self.pace.value


class Acceptance:
    """The chance that a draft token is kept: kept tokens over kept tokens + rejections (a maximum-likelihood estimate
    for drafts verified until their first rejection), recent steps weighing most (each step multiplies the past by
    `decay`), blended with `prior` (another Acceptance or a number) at the weight of `prior_weight` tokens."""

    def __init__(self, decay: float, prior=0.5, prior_weight: float = 2.0):
        self.decay = decay
        self.prior = prior
        self.prior_weight = prior_weight
        self.kept = 0.0
        self.rejected = 0.0

    def add(self, drafted: int, kept: int, rejected: bool) -> None:
        """Record a verified draft of `drafted` tokens of which the first `kept` were kept (`rejected`: the next one
        was not; False when the draft was kept whole or the sequence ended inside it)."""
        if drafted <= 0:
            return
        self.kept = self.decay * self.kept + kept
        self.rejected = self.decay * self.rejected + (1.0 if rejected else 0.0)

    @property
    def value(self) -> float:
        """The estimated chance, in [0, 1]."""
        prior = self.prior.value if isinstance(self.prior, Acceptance) else float(self.prior)
        return (self.kept + self.prior_weight * prior) / (self.kept + self.rejected + self.prior_weight)


class DraftSource:
    """What every request drafting from one source (a draft model; prompt lookup on one model) shares, across
    requests and generations: the source's long-run acceptance (each new request's prior) and the probe schedule —
    plain decisions counted since the last probe, and how many are due before the next (FIRST_PROBE, doubling after
    each probe that finds drafting still does not pay, up to LAST_PROBE; back to FIRST_PROBE once it pays) — and the
    seconds those plain decisions' steps took: a probe is due only once PROBE_BUDGET of them pays for what it costs
    beyond a plain step (a draft model's catch-up on the tokens it sat out included), so probing costs at most that
    share of the time decoding spends plain, however dear the draft."""

    FIRST_PROBE, LAST_PROBE = 8, 128
    PROBE_BUDGET = 0.02

    def __init__(self):
        self.acceptance = Acceptance(decay=0.98)
        self.plain_run = 0
        self.plain_seconds = 0.0
        self.probe_after = self.FIRST_PROBE

    def probe_due(self, step_seconds: float = 0.0, probe_seconds: float = 0.0) -> bool:
        """Count one plain decision whose step takes `step_seconds` (this request's share) -> whether a probe that
        would cost `probe_seconds` more than that step is due now (then the counts start again, and the next is due
        after twice as many decisions)."""
        self.plain_run += 1
        self.plain_seconds += step_seconds
        if self.plain_run < self.probe_after or self.plain_seconds * self.PROBE_BUDGET < probe_seconds:
            return False
        self.plain_run, self.plain_seconds = 0, 0.0
        self.probe_after = min(2 * self.probe_after, self.LAST_PROBE)
        return True

    def pays(self) -> None:
        """Drafting pays: the next plain spell probes early again."""
        self.plain_run, self.plain_seconds, self.probe_after = 0, 0.0, self.FIRST_PROBE


def lookup_source(model) -> DraftSource:
    """Prompt lookup's DraftSource on `model`."""
    source = _LOOKUP_SOURCES.get(model)
    if source is None:
        source = _LOOKUP_SOURCES[model] = DraftSource()
    return source


def expected_extra_tokens(acceptance: float, k: int) -> float:
    """Tokens beyond the one every step gives, on average, from a draft of k tokens each kept with this chance until
    the first rejection: a + a^2 + ... + a^k."""
    a = min(max(acceptance, 0.0), 1.0)
    return float(k) if a >= 1.0 else a * (1 - a ** k) / (1 - a)


class DraftPayoff:
    """One request's choice of draft length, step by step (see the module): `plan` before the step, `record` after
    its verification. `draft_steps` / `plain_steps` count the decode steps that verified drafts and those that ran
    plain (drafting did not pay, a probe was not due, or prompt lookup found nothing).

    forward: the CostTable of the model's forward passes; draft_costs: the draft model's (None: prompt lookup, free);
    source: the DraftSource (long-run acceptance, probe schedule) this request shares with the others drafting
    from the same place.
    """

    # False (TINYLLAMA_DRAFT_ALWAYS=1): every step drafts the most it may, paying or not (what the tests of the
    # drafting mechanics and an acceptance measurement need).
    adaptive = os.environ.get("TINYLLAMA_DRAFT_ALWAYS", "") not in ("1", "true", "yes")
    # Drafting must promise this much more than plain decoding's rate: under load a drafting step of an int4 draft
    # (3-layer model of TinyLlama's width) measured 18% dearer than its forward passes' table estimate.
    MARGIN = 0.10
    HORIZON = 64  # tokens over which a draft model's catch-up is paid back, at most
    DECAY = 0.85  # per verified step, of the request's own acceptance counts
    # Tokens' worth of the draft source's long-run acceptance in a request's estimate: with 2, one lucky 1-token
    # probe of an int4 draft keeping 26% lifted the estimate to 51% and set off drafting that did not pay.
    PRIOR_WEIGHT = 8.0

    def __init__(self, speculate: int, forward: CostTable, draft_costs: CostTable | None, source: DraftSource):
        self.speculate = speculate
        self.forward = forward
        self.draft_costs = draft_costs
        self.source = source
        self.acceptance = Acceptance(self.DECAY, prior=source.acceptance, prior_weight=self.PRIOR_WEIGHT)
        self.draft_steps = 0
        self.plain_steps = 0
        self.probes = 0

    def plan(self, room: int, tokens: int = 1, rows: int = 1, behind: int = 1, sharing: int = 1,
             remaining: int | None = None) -> int:
        """Draft tokens to ask for this step (0: decode plainly).

        room: most draft tokens the window and max_new_tokens leave; tokens: sequences decoding in this step (each
        gives one token without drafts); rows: rows of the step's forward pass without this request's drafts;
        behind: tokens the draft model must be fed before it drafts (1 when it is in step); sharing: sequences its
        passes served last time (a pass's cost is shared by them); remaining: tokens this request may still make.
        """
        n = min(self.speculate, room)
        if n <= 0:
            return 0
        if not self.adaptive:
            return n
        plain = self.forward.seconds(rows)
        if plain is None or not self.forward.fresh(rows):
            return 0  # measure what a plain step of this batch costs first
        if self.draft_costs is not None and self.draft_costs.empty:
            return self._probe(n)  # the draft model has never run: its cost is only known by running it
        a = self.acceptance.value
        rates = self.rates(n, tokens, rows, behind, sharing, remaining, plain, a)
        best = max(range(1, n + 1), key=lambda k: rates[k])
        if rates[best] > rates[0] * (1 + self.MARGIN):
            self.source.pays()
            return best
        per_draft_pass, catch_up = self._draft_seconds(rows=sharing, behind=behind)
        probe_seconds = self.forward.seconds(rows + best) - plain + best * per_draft_pass + catch_up  # all of it
        if not self.source.probe_due(plain / max(1, tokens), probe_seconds):
            return 0
        optimistic = self.rates(n, tokens, rows, behind, sharing, remaining, plain, 1 - (1 - a) / 2)
        if max(optimistic[1:]) <= optimistic[0] * (1 + self.MARGIN):
            return 0  # could not pay even with half the rejections (a draft model's catch-up counted): no probe
        return self._probe(best)

    def rates(self, n: int, tokens: int, rows: int, behind: int, sharing: int, remaining: int | None,
              plain: float, a: float) -> list[float]:
        """Expected tokens per second of the step for draft lengths 0..n (index k), at acceptance `a`."""
        out = [tokens / plain]
        per_draft_pass, catch_up = self._draft_seconds(rows=sharing, behind=behind)
        for k in range(1, n + 1):
            extra = expected_extra_tokens(a, k)
            steps_ahead = max(1.0, min(remaining or self.HORIZON, self.HORIZON) / (1 + extra))
            seconds = self.forward.seconds(rows + k) + k * per_draft_pass + catch_up / steps_ahead
            out.append((tokens + extra) / seconds)
        return out

    def _draft_seconds(self, rows: int, behind: int) -> tuple[float, float]:
        """(this request's share of one draft pass, the extra seconds of catching up `behind` tokens)."""
        if self.draft_costs is None:
            return 0.0, 0.0
        rows = max(1, rows)
        one = self.draft_costs.seconds(rows) / rows
        usual = min(behind, 2)  # in step, the first pass feeds the 1 or 2 tokens the last verification kept
        catch_up = max(0.0, self.draft_costs.seconds(rows - 1 + behind) - self.draft_costs.seconds(rows - 1 + usual))
        return one, catch_up

    def _probe(self, k: int) -> int:
        self.probes += 1
        return k

    def record(self, drafted: int, kept: int, ended: bool = False) -> None:
        """After the step's verification: `drafted` draft tokens verified (0: a plain step), the first `kept` kept;
        `ended`: the sequence stopped inside the draft (what followed was never judged)."""
        if drafted <= 0:
            self.plain_steps += 1
            return
        self.draft_steps += 1
        rejected = kept < drafted and not ended
        self.acceptance.add(drafted, kept, rejected)
        self.source.acceptance.add(drafted, kept, rejected)


def describe(draft_tokens: int, accepted: int, draft_steps: int, plain_steps: int) -> str:
    """One line on what speculation did for a generation: drafts kept, steps that drafted, steps that ran plain."""
    kept = f"{accepted}/{draft_tokens} drafts accepted ({100 * accepted / draft_tokens:.0f}%)" if draft_tokens \
        else "no drafts"
    line = f"{kept} in {draft_steps} drafting step{'s' * (draft_steps != 1)}"
    if plain_steps:
        line += f", {plain_steps} plain step{'s' * (plain_steps != 1)} (drafting did not pay or found nothing)"
    return line
