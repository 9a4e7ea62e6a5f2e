"""Real-cluster experiments around the simulator (disagg/sim/): fitting its step-time model to the real engine
(`calibrate`, `disagg bench calibrate`), measuring what a shared machine adds (`machine`) and checking the simulator
against real runs (`validate`)."""
