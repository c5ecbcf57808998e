"""Size tiers, LSM style: the merge policy shared by the document-id runs and the index shards.

Units (id runs, HNSW indexes) sit in tiers by size: tier 0 below `base` items, tier t from
base * factor**(t-1) up to base * factor**t. Whenever a tier holds `factor` units or more, they are
merged into one (which may land in the next tier and fill it in turn). So at most factor - 1 units
sit in each tier and a lookup or a search touches O(factor x tiers) = O(factor x log_factor(n)) units,
while each item is rewritten once per tier it climbs (O(log n) times in all).

With a `cap`, no merge makes a unit of more than `cap` items: a full tier is packed into merges of at
most `cap` each, and a unit that cannot merge with another under the cap stays as it is. Above the
cap the top tier simply grows, by one unit of about `cap` items per `cap` items added (an index shard
that must fit one machine's memory).
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


def plan_merges(sizes: list[int], base: int, factor: int, cap: int | None = None) -> list[list[int]]:
    """Which units to merge, as lists of indexes into `sizes`, each list becoming one unit; units in no list
    stay as they are. Cascades are planned through (a merged unit that fills the next tier is merged again,
    into one list), so each unit is rewritten at most once by the plan."""
    units = [{"size": size, "members": [i], "frozen": cap is not None and size > cap // 2}
             for i, size in enumerate(sizes)]
    while True:
        by_tier: dict[int, list[int]] = {}
        for j, u in enumerate(units):
            if not u["frozen"]:
                by_tier.setdefault(tier_of(u["size"], base, factor), []).append(j)
        full = sorted(t for t, js in by_tier.items() if len(js) >= factor)
        if not full:
            break
        take = sorted(by_tier[full[0]], key=lambda j: -units[j]["size"])
        bins: list[list[int]] = []
        for j in take:  # first fit, largest first: merges of at most `cap` items
            for b in bins:
                if cap is None or sum(units[i]["size"] for i in b) + units[j]["size"] <= cap:
                    b.append(j)
                    break
            else:
                bins.append([j])
        merged = []
        for b in bins:
            if len(b) == 1:
                units[b[0]]["frozen"] = True  # nothing fits beside it under the cap
                continue
            size = sum(units[i]["size"] for i in b)
            merged.append({"size": size, "members": sorted(m for i in b for m in units[i]["members"]),
                           "frozen": cap is not None and size > cap // 2})
        gone = {i for b in bins if len(b) > 1 for i in b}
        units = [u for j, u in enumerate(units) if j not in gone] + merged
    return [u["members"] for u in units if len(u["members"]) > 1]
