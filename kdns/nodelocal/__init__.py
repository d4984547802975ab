"""Node-local mode: a kdns on every node answering from the central kdns's image, streamed."""
