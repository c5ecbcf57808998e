"""Size tiers, LSM style: the merge policy shared by the document-id runs and the index shards.

Units (id runs, HNSW indexes) sit in tiers by size: tier 0 below `base` items, tier t from
base * factor**(t-1) up to base * factor**t. Whenever a tier holds `factor` units or more, they are
merged into one (which may land in the next tier and fill it in turn). So at most factor - 1 units
sit in each tier and a lookup or a search touches O(factor x tiers) = O(factor x log_factor(n)) units,
while each item is rewritten once per tier it climbs (O(log n) times in all).
"""

from __future__ import annotations


def tier_of(size: int, base: int, factor: int) -> int:
    if size < base:
        return 0
    tier, limit = 1, base * factor
    while size >= limit:
        tier += 1
        limit *= factor
    return tier


def plan_merges(sizes: list[int], base: int, factor: int) -> list[list[int]]:
    """Which units to merge, as lists of indexes into `sizes`, each list becoming one unit; units in no list
    stay as they are. Cascades are planned through (a merged unit that fills the next tier is merged again,
    into one list), so each unit is rewritten at most once by the plan."""
    units = [(size, [i]) for i, size in enumerate(sizes)]
    while True:
        by_tier: dict[int, list[int]] = {}
        for j, (size, _) in enumerate(units):
            by_tier.setdefault(tier_of(size, base, factor), []).append(j)
        full = sorted(t for t, js in by_tier.items() if len(js) >= factor)
        if not full:
            break
        take = set(by_tier[full[0]])
        merged = (sum(units[j][0] for j in take), sorted(i for j in take for i in units[j][1]))
        units = [u for j, u in enumerate(units) if j not in take] + [merged]
    return [members for _, members in units if len(members) > 1]
