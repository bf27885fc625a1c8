//! Which RTP lower transport the next connection attempt of one RTSP stream uses (issue 16).
//!
//! In: how each attempt ended ([`AttemptEnd`], classified by the ingest thread from the bus and
//! the no-frame watchdog). Out: the transport for the next attempt and whether to wait first
//! ([`Next`]). Plain data owned by the stream's ingest thread; no GStreamer here, so the policy is
//! unit-tested on its own.
//!
//! Why not rtspsrc's own fallback: with `protocols=tcp+udp` rtspsrc always tries UDP first and
//! only moves to TCP after its UDP timeout; cameras behind NAT or lossy links want TCP first, and
//! UDP-only servers (VLC's, some NVRs) answer a TCP SETUP with 461, which through uridecodebin
//! surfaces as "missing a plug-in". So each attempt gets exactly one transport and this policy
//! picks it: `auto` tries TCP, then UDP when TCP was refused, then TCP again when UDP delivered
//! nothing; the transport that delivered frames is remembered and tried first on every later
//! reconnect. `tcp` and `udp` force one.

use std::fmt;
use std::time::Duration;

use super::config::Transport;

/// One RTP lower transport, as rtspsrc's `protocols` property spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lower {
    Tcp,
    Udp,
}

impl Lower {
    /// The rtspsrc `protocols` value that allows only this transport.
    pub fn protocols(self) -> &'static str {
        match self {
            Lower::Tcp => "tcp",
            Lower::Udp => "udp",
        }
    }
    fn other(self) -> Lower {
        match self {
            Lower::Tcp => Lower::Udp,
            Lower::Udp => Lower::Tcp,
        }
    }
}

impl fmt::Display for Lower {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Lower::Tcp => "TCP",
            Lower::Udp => "UDP",
        })
    }
}

/// How one attempt ended, as far as the transport is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptEnd {
    /// Frames arrived over this transport (the stream may have been lost later).
    Delivered,
    /// The server refused this transport (RTSP 461 to SETUP).
    Refused,
    /// The server accepted the transport but no frame came within the watchdog timeout.
    Silent(Duration),
    /// Failed for a reason no other transport fixes (server down, 401, 404, …).
    Other,
}

impl AttemptEnd {
    /// The failure in words (`the server refused RTP over TCP`).
    pub fn describe(&self, t: Lower) -> String {
        match self {
            AttemptEnd::Refused => format!("the server refused RTP over {t}"),
            AttemptEnd::Silent(d) => {
                format!("{t} delivered nothing within {:.1} s", d.as_secs_f64())
            }
            AttemptEnd::Delivered | AttemptEnd::Other => format!("{t} failed"),
        }
    }
}

/// What the ingest thread does after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Reconnect with the same transport after the usual back-off.
    Retry,
    /// Try `to` at once (no back-off): `because` says why the last one failed, in words.
    Switch { to: Lower, because: String },
    /// Every transport failed in a row: back off, then start again from the preferred one.
    /// `because` is the sentence for the log ("the server refused RTP over TCP and UDP
    /// delivered nothing within 5.0 s").
    Exhausted { because: String },
}

/// Transport state of one stream.
#[derive(Debug, Clone)]
pub struct TransportChoice {
    mode: Transport,
    current: Lower,
    /// The transport that last delivered frames.
    worked: Option<Lower>,
    /// Earlier transport failure in this round (transport, how), if any.
    failed: Option<(Lower, AttemptEnd)>,
}

impl TransportChoice {
    pub fn new(mode: Transport) -> Self {
        Self {
            mode,
            current: match mode {
                Transport::Udp => Lower::Udp,
                Transport::Tcp | Transport::Auto => Lower::Tcp,
            },
            worked: None,
            failed: None,
        }
    }

    /// The transport for the next attempt.
    pub fn current(&self) -> Lower {
        self.current
    }

    /// The transport that last delivered frames, if any.
    pub fn worked(&self) -> Option<Lower> {
        self.worked
    }

    /// Record how the attempt with [`TransportChoice::current`] ended.
    pub fn record(&mut self, end: AttemptEnd) -> Next {
        let t = self.current;
        match end {
            AttemptEnd::Delivered => {
                self.worked = Some(t);
                self.failed = None;
                Next::Retry
            }
            AttemptEnd::Other => {
                // Not the transport's fault: the round starts over on the next transport failure.
                self.failed = None;
                Next::Retry
            }
            AttemptEnd::Refused | AttemptEnd::Silent(_) if self.mode != Transport::Auto => {
                Next::Retry
            }
            AttemptEnd::Refused | AttemptEnd::Silent(_) => match self.failed.take() {
                Some((before, how)) if before == t.other() => {
                    // Both failed in a row: next round starts from the one that worked, else TCP.
                    self.current = self.worked.unwrap_or(Lower::Tcp);
                    let (tcp, udp) = match t {
                        Lower::Udp => (how.describe(before), end.describe(t)),
                        Lower::Tcp => (end.describe(t), how.describe(before)),
                    };
                    Next::Exhausted {
                        because: format!("{tcp} and {udp}"),
                    }
                }
                _ => {
                    let because = end.describe(t);
                    self.failed = Some((t, end));
                    self.current = t.other();
                    Next::Switch {
                        to: self.current,
                        because,
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIVE: Duration = Duration::from_secs(5);

    #[test]
    fn auto_falls_back_to_udp_when_tcp_is_refused_and_remembers_it() {
        let mut c = TransportChoice::new(Transport::Auto);
        assert_eq!(c.current(), Lower::Tcp);
        assert_eq!(
            c.record(AttemptEnd::Refused),
            Next::Switch {
                to: Lower::Udp,
                because: "the server refused RTP over TCP".into()
            }
        );
        assert_eq!(c.current(), Lower::Udp);
        assert_eq!(c.record(AttemptEnd::Delivered), Next::Retry);
        assert_eq!(c.worked(), Some(Lower::Udp));
        // Later losses (server restarted, hung) reconnect over what worked.
        assert_eq!(c.record(AttemptEnd::Other), Next::Retry);
        assert_eq!(c.current(), Lower::Udp);
    }

    #[test]
    fn auto_goes_back_to_tcp_when_udp_delivers_nothing() {
        let mut c = TransportChoice::new(Transport::Auto);
        c.record(AttemptEnd::Refused);
        c.record(AttemptEnd::Delivered); // UDP worked once
        assert_eq!(
            c.record(AttemptEnd::Silent(FIVE)),
            Next::Switch {
                to: Lower::Tcp,
                because: "UDP delivered nothing within 5.0 s".into()
            }
        );
        assert_eq!(c.record(AttemptEnd::Delivered), Next::Retry);
        assert_eq!(c.worked(), Some(Lower::Tcp));
    }

    #[test]
    fn auto_says_in_words_when_no_transport_works_then_starts_over() {
        let mut c = TransportChoice::new(Transport::Auto);
        c.record(AttemptEnd::Refused);
        assert_eq!(
            c.record(AttemptEnd::Silent(FIVE)),
            Next::Exhausted {
                because: "the server refused RTP over TCP and UDP delivered nothing within 5.0 s"
                    .into()
            }
        );
        assert_eq!(c.current(), Lower::Tcp);
        // A failure that is not the transport's (server down) breaks the round.
        assert!(matches!(
            c.record(AttemptEnd::Refused),
            Next::Switch { to: Lower::Udp, .. }
        ));
        assert_eq!(c.record(AttemptEnd::Other), Next::Retry);
        assert!(matches!(c.record(AttemptEnd::Refused), Next::Switch { .. }));
    }

    #[test]
    fn forced_transports_never_switch() {
        for (mode, t) in [(Transport::Tcp, Lower::Tcp), (Transport::Udp, Lower::Udp)] {
            let mut c = TransportChoice::new(mode);
            for end in [
                AttemptEnd::Refused,
                AttemptEnd::Silent(FIVE),
                AttemptEnd::Other,
            ] {
                assert_eq!(c.record(end), Next::Retry);
                assert_eq!(c.current(), t);
            }
        }
    }
}
