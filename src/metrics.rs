//! Every Prometheus family carpool exports.
