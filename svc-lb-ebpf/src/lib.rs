// This file exists to enable the library target (so svc-lb can list this crate as a
// build-dependency and cargo rebuilds the object when it changes).
#![no_std]
