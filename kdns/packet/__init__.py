"""The packet path: the compiled extension the workers run (parse, trie walk, answer, UDP
batch loop, TCP framing, packet cache, compiled forward), its pure twin, and the layout of
the counters it writes. Imports nothing of the control plane."""
