"""Graph passes over MoE blocks: detect, observe, merge, router, losparse, lower (one file a pass)."""
