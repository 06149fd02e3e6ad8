"""Data: scan image folders, decode and presize on the CPU, shard across ranks, augment on device."""
