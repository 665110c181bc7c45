"""Communication: the ring's group, transports (NCCL, copy engine, gloo, simulated), persistent
buffers, the comm stream and the hop watchdog. Nothing here knows of masks or attention."""
