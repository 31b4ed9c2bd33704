"""Raft consensus for spina_fast: the node driver, its peer transport and its write-ahead log."""
