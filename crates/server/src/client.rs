//! Who a request comes from, and how much of each concurrency budget one client may hold.
//!
//! A client is the address its connection comes from. When that address is one of the
//! `trusted_proxies`, the client is the address the proxy forwarded: `X-Forwarded-For`
//! read from the right, skipping every trusted hop (a client cannot pass itself off as
//! another by writing the header, since only what trusted proxies appended is read).
//! A client may hold at most `max_client_share` of each budget at once, so one client
//! with many connections or streams cannot take every place from the others.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use parking_lot::Mutex;

/// The header proxies name the client in.
pub const FORWARDED_FOR: &str = "x-forwarded-for";

/// A network of addresses: `10.0.0.0/8`, `fd00::/8`, or one address (`10.1.2.3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Whether `ip` is in the network; an IPv4 address written as IPv6 (`::ffff:a.b.c.d`)
    /// counts as the IPv4 one.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

/// Whether the first `prefix` bits of `a` and `b` are equal.
fn prefix_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let (whole, rest) = (usize::from(prefix / 8), prefix % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a[whole] & mask == b[whole] & mask
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("'{s}' is not an IP address or network (e.g. 10.0.0.0/8)"))?;
        let addr = addr.to_canonical();
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= bits)
                .ok_or_else(|| format!("'{s}': the prefix length must be 0..={bits}"))?,
        };
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl serde::Serialize for IpNet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for IpNet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Who sent a request: an address, or unknown (a request that came through no socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Client(pub Option<IpAddr>);

impl Client {
    /// The client of a connection from `peer` that carried the `X-Forwarded-For` values
    /// `forwarded` (in the order the headers came), given the `trusted` proxies.
    pub fn resolve<'a>(
        peer: Option<IpAddr>,
        forwarded: impl DoubleEndedIterator<Item = &'a str>,
        trusted: &[IpNet],
    ) -> Self {
        let Some(mut addr) = peer.map(|p| p.to_canonical()) else {
            return Self(None);
        };
        let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
        if is_trusted(addr) {
            for hop in forwarded.rev().flat_map(|h| h.rsplit(',')) {
                // An address this proxy could not name ends the walk at the proxy.
                let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                    break;
                };
                addr = ip.to_canonical();
                if !is_trusted(addr) {
                    break;
                }
            }
        }
        Self(Some(addr))
    }
}

/// Who made a request: the `Authorization` value it carried, and its client.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// The `Authorization` header (HTTP) or metadata (gRPC), if any.
    pub authorization: Option<String>,
    /// Where it came from.
    pub client: Client,
}

/// How many places of one budget each client holds, and the most one may hold.
#[derive(Debug)]
pub struct ClientLimit {
    /// The most places one client may hold.
    pub most: u32,
    held: Mutex<HashMap<IpAddr, u32>>,
}

impl ClientLimit {
    /// The limit for a budget of `places`, of which one client may hold `share` (at
    /// least one place); `None` when a client may hold them all.
    pub fn new(places: u32, share: f64) -> Option<Arc<Self>> {
        let most = ((f64::from(places) * share).ceil() as u32).max(1);
        (most < places).then(|| {
            Arc::new(Self {
                most,
                held: Mutex::new(HashMap::new()),
            })
        })
    }

    /// Takes one place for `client`, or `None` when it holds its most already. An
    /// unknown client is not limited.
    pub fn take(self: &Arc<Self>, client: Client) -> Option<ClientPlace> {
        let Some(ip) = client.0 else {
            return Some(ClientPlace(None));
        };
        let mut held = self.held.lock();
        let n = held.entry(ip).or_insert(0);
        if *n >= self.most {
            return None;
        }
        *n += 1;
        Some(ClientPlace(Some((Arc::clone(self), ip))))
    }
}

/// One place a client holds; given back when dropped.
#[derive(Debug)]
pub struct ClientPlace(Option<(Arc<ClientLimit>, IpAddr)>);

impl Drop for ClientPlace {
    fn drop(&mut self) {
        if let Some((limit, ip)) = self.0.take() {
            let mut held = limit.held.lock();
            if let Some(n) = held.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    held.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_contain_their_addresses() {
        let net: IpNet = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains(ip("10.200.1.2")));
        assert!(net.contains(ip("::ffff:10.1.1.1")));
        assert!(!net.contains(ip("11.0.0.1")));
        let odd: IpNet = "192.168.4.0/22".parse().unwrap();
        assert!(odd.contains(ip("192.168.7.255")));
        assert!(!odd.contains(ip("192.168.8.0")));
        let one: IpNet = "127.0.0.1".parse().unwrap();
        assert_eq!(one.to_string(), "127.0.0.1/32");
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        let v6: IpNet = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        assert!(
            "0.0.0.0/0"
                .parse::<IpNet>()
                .unwrap()
                .contains(ip("8.8.8.8"))
        );
        for bad in ["10.0.0.0/33", "proxy", "10.0.0.0/x", "fd00::/129", ""] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
        assert_eq!(
            "10.0.0.0/33".parse::<IpNet>().unwrap_err(),
            "'10.0.0.0/33': the prefix length must be 0..=32"
        );
    }

    #[test]
    fn forwarded_addresses_count_only_behind_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let resolve = |peer: &str, headers: &[&str]| {
            Client::resolve(Some(ip(peer)), headers.iter().copied(), &trusted).0
        };
        // From an untrusted peer the header is the client's own word: ignored.
        assert_eq!(resolve("1.2.3.4", &["5.6.7.8"]), Some(ip("1.2.3.4")));
        // Behind a trusted proxy: the address it appended.
        assert_eq!(resolve("10.0.0.5", &["5.6.7.8"]), Some(ip("5.6.7.8")));
        // A client's own forged entries sit left of what the proxies appended.
        assert_eq!(
            resolve("10.0.0.5", &["9.9.9.9, 5.6.7.8", "10.0.0.7"]),
            Some(ip("5.6.7.8"))
        );
        // No header, or one the proxy could not fill: the proxy itself.
        assert_eq!(resolve("10.0.0.5", &[]), Some(ip("10.0.0.5")));
        assert_eq!(resolve("10.0.0.5", &["unknown"]), Some(ip("10.0.0.5")));
        assert_eq!(
            Client::resolve(None, std::iter::empty(), &trusted),
            Client(None)
        );
    }

    #[test]
    fn a_client_holds_at_most_its_share_and_gives_places_back() {
        assert!(ClientLimit::new(8, 1.0).is_none());
        let limit = ClientLimit::new(8, 0.25).unwrap();
        assert_eq!(limit.most, 2);
        let (a, b) = (Client(Some(ip("1.1.1.1"))), Client(Some(ip("2.2.2.2"))));
        let first = limit.take(a).unwrap();
        let _second = limit.take(a).unwrap();
        assert!(limit.take(a).is_none(), "a third place for one client");
        let _other = limit.take(b).expect("another client is not held up");
        drop(first);
        assert!(limit.take(a).is_some(), "a place given back is free again");
        assert!((0..100).all(|_| limit.take(Client(None)).is_some()));
        assert_eq!(ClientLimit::new(3, 0.01).unwrap().most, 1);
    }
}
