"""The maths of an attribution: one pass, its paths and rules, accuracy, IDGI, faithfulness; imports neither the wire nor the daemon."""
