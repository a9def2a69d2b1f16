//! The page's client address. Forwarded-for headers are anyone's to write, so
//! they are believed only when the TCP peer is a proxy the operator named
//! (`--trusted-proxies`); otherwise the peer's own address counts, for the
//! rate limits and the logged `ip`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use axum::http::HeaderMap;

/// An address block: `10.0.0.0/8`, `::1/128`, or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Whether `ip` is inside the block (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr = canonical(
            a.parse::<IpAddr>()
                .map_err(|_| format!("{s:?} is not an IP address or CIDR block (e.g. 10.0.0.0/8, ::1)"))?,
        );
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("{s:?}: the prefix length must be 0 to {max}")),
            },
        };
        Ok(IpNet { addr, prefix })
    }
}

/// `::ffff:1.2.3.4` as `1.2.3.4`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// One address of a forwarded-for list: `1.2.3.4`, `1.2.3.4:5678`,
/// `[2001:db8::1]:80`, `"[2001:db8::1]"`, `2001:db8::1`.
fn parse_node(s: &str) -> Option<IpAddr> {
    let s = s.trim().trim_matches('"');
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest
            .split(']')
            .next()?
            .parse::<Ipv6Addr>()
            .ok()
            .map(|ip| canonical(IpAddr::V6(ip)));
    }
    let (host, _port) = s.rsplit_once(':')?;
    host.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

/// The client of a request that reached `peer`, a proxy in `trusted`: the
/// right-most `X-Forwarded-For` (then `Forwarded: for=`) address that is not
/// itself a trusted proxy — proxies append, so that is the last hop a trusted
/// proxy saw — else `X-Real-IP`, else `CF-Connecting-IP`.
fn forwarded_client(headers: &HeaderMap, trusted: &[IpNet]) -> Option<IpAddr> {
    let values = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(*ip));
    let from_chain = |chain: Vec<Option<IpAddr>>| -> Option<IpAddr> {
        if chain.is_empty() || chain.iter().any(Option::is_none) {
            // A garbled list: none of it can be believed.
            return None;
        }
        let chain: Vec<IpAddr> = chain.into_iter().flatten().collect();
        chain.iter().rev().find(|ip| !is_trusted(ip)).or(chain.first()).copied()
    };
    let xff: Vec<Option<IpAddr>> = values("x-forwarded-for").iter().map(|s| parse_node(s)).collect();
    if let Some(ip) = from_chain(xff) {
        return Some(ip);
    }
    let fwd: Vec<Option<IpAddr>> = values("forwarded")
        .iter()
        .filter_map(|elem| {
            elem.split(';')
                .filter_map(|pair| pair.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("for"))
                .map(|(_, v)| parse_node(v))
        })
        .collect();
    if let Some(ip) = from_chain(fwd) {
        return Some(ip);
    }
    ["x-real-ip", "cf-connecting-ip"]
        .iter()
        .find_map(|h| values(h).first().and_then(|s| parse_node(s)))
}

/// The address a request counts as: the TCP peer, or when the peer is a
/// trusted proxy, the client it forwarded for.
pub fn client_ip(headers: &HeaderMap, peer: Option<IpAddr>, trusted: &[IpNet]) -> String {
    let Some(peer) = peer.map(canonical) else {
        return String::new();
    };
    if trusted.iter().any(|n| n.contains(peer)) {
        if let Some(ip) = forwarded_client(headers, trusted) {
            return ip.to_string();
        }
    }
    peer.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|x| x.parse().unwrap()).collect()
    }

    #[test]
    fn blocks() {
        let n: IpNet = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains("10.1.200.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.0.9".parse().unwrap()));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let v6: IpNet = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!v6.contains("10.1.0.0".parse().unwrap()));
        assert_eq!("::1".parse::<IpNet>().unwrap().to_string(), "::1/128");
        assert!("10.0.0.0/33".parse::<IpNet>().unwrap_err().contains("0 to 32"));
        assert!("localhost".parse::<IpNet>().unwrap_err().contains("not an IP address"));
    }

    #[test]
    fn headers_from_an_untrusted_peer_are_ignored() {
        let h = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("cf-connecting-ip", "5.6.7.8"),
            ("x-real-ip", "9.9.9.9"),
            ("forwarded", "for=4.4.4.4"),
        ]);
        let peer = Some("127.0.0.1".parse().unwrap());
        assert_eq!(client_ip(&h, peer, &[]), "127.0.0.1");
        assert_eq!(client_ip(&h, peer, &nets(&["10.0.0.0/8"])), "127.0.0.1");
    }

    #[test]
    fn a_trusted_proxy_names_the_client() {
        let peer = Some("10.0.0.2".parse().unwrap());
        let t = nets(&["10.0.0.0/8"]);
        // The client put 6.6.6.6 in front itself; the proxy appended the real one.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 1.2.3.4, 10.0.0.7")]);
        assert_eq!(client_ip(&h, peer, &t), "1.2.3.4");
        let h = headers(&[("forwarded", "for=\"[2001:db8::1]:4711\";proto=https")]);
        assert_eq!(client_ip(&h, peer, &t), "2001:db8::1");
        let h = headers(&[("x-real-ip", "1.2.3.4")]);
        assert_eq!(client_ip(&h, peer, &t), "1.2.3.4");
        let h = headers(&[("cf-connecting-ip", "5.6.7.8")]);
        assert_eq!(client_ip(&h, peer, &t), "5.6.7.8");
        let h = headers(&[("x-forwarded-for", "1.2.3.4:5678")]);
        assert_eq!(client_ip(&h, peer, &t), "1.2.3.4");
        // Garbage is not believed.
        let h = headers(&[("x-forwarded-for", "not-an-ip")]);
        assert_eq!(client_ip(&h, peer, &t), "10.0.0.2");
        assert_eq!(client_ip(&HeaderMap::new(), peer, &t), "10.0.0.2");
    }
}
