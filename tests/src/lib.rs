//! Helpers for svc-lb's privileged tests.
