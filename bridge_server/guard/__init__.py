"""What protects the token and records what happened: the PIN guard, the command policy, the
guardrails that apply both per APDU, flood limits, the audit log and whole-file state writes."""
