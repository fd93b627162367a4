"""The run folder: what training writes into it and how evaluation and inference read it back. No torch."""
