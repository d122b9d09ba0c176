"""tools/bench_mixed.py: the paired comparison of two plans' top-1 hits, per point and pooled over points."""

from __future__ import annotations

from tools.bench_mixed import discordant, pooled_discordant


def hits(pattern: str) -> dict:
    return {"top1_hits": pattern}


def test_discordant_counts_images_only_one_plan_keeps() -> None:
    assert discordant(hits("1100"), hits("1100"), None) == "0 / 0"
    assert discordant(hits("1110"), hits("1001"), None).startswith("2 / 1 (p ")


def test_crops_of_one_photo_are_one_sign_flip() -> None:
    # 12 images, all kept only by the first plan: 12 independent images are significant,
    # 12 crops of one photo are a single coin flip.
    first, second = hits("1" * 12), hits("0" * 12)
    assert float(discordant(first, second, None).split("p ")[1].rstrip(")")) < 0.01
    assert discordant(first, second, [0] * 12) == "12 / 0 (p 1.00)"


def test_pooled_sums_each_source_over_the_points() -> None:
    one_way = [(hits("1111" + "0" * 4), hits("0" * 8), list(range(8)))] * 3
    assert pooled_discordant(one_way).startswith("12 / 0 (p 0.")
    # The same photos won by one plan at one budget and by the other at the next cancel out.
    cancelling = [(hits("11110000"), hits("00000000"), list(range(8))),
                  (hits("00000000"), hits("11110000"), list(range(8)))]
    assert pooled_discordant(cancelling) == "4 / 4 (p 1.00; 2 of 2 points differ)"
    assert pooled_discordant([(hits("10"), hits("10"), None)]) == "0 / 0 over 1 point"
