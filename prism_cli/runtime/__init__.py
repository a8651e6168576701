"""The elastic model at inference: allocation policies, the gate-neuron router, operating points."""
