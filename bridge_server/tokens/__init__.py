"""One task per token: its lease book, the device it opens, the virtual reader clients see,
lease epochs and counters."""
