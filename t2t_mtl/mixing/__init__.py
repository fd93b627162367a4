"""Mixing task records into one deterministic, resumable stream, and the replay buffer of earlier stages. No torch."""
