"""Pure pieces with no model inside: fusion math and solvers, config, errors, text."""
