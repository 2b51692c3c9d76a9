"""Which examples share a packed row: first-fit decreasing, shared by every task that packs."""

from __future__ import annotations


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most `capacity` tokens (a longer example gets a row of its own):
    longest first, each into the first row with room."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if row is None:
            rows.append([])
            room.append(max(capacity, lengths[i]))
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows
