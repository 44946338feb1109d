//! A minimal DNS server on 127.0.0.1 for the hostname attempt: it answers an A query for
//! [`HOSTNAME`] with [`HOSTNAME_ADDR`] and every other query with an empty NOERROR answer. The
//! agent resolves the endpoint's `hosts:` through it (`tessera run --dns-server`).

use std::net::{Ipv4Addr, UdpSocket};

/// The hostname the self-test policy protects.
pub const HOSTNAME: &str = "vault.selftest.tessera.test";
/// What it resolves to (a loopback address only the self-test listens on).
pub const HOSTNAME_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

const TYPE_A: u16 = 1;
const TTL: u32 = 300;

/// Starts the server; returns its port.
pub fn start() -> std::io::Result<u16> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let port = socket.local_addr()?.port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            if let Some(reply) = answer(&buf[..n]) {
                let _ = socket.send_to(&reply, peer);
            }
        }
    });
    Ok(port)
}

/// The reply to one query, or None when it is not a well-formed single-question query.
fn answer(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 || query[4..6] != [0, 1] {
        return None;
    }
    // The question: labels up to the root label, then type and class.
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(i)?);
        i += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(query.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*query.get(i)?, *query.get(i + 1)?]);
    let question_end = i + 4;
    let question = query.get(12..question_end)?;
    let matches = labels.join(".") == HOSTNAME && qtype == TYPE_A;

    let mut reply = Vec::with_capacity(question_end + 16);
    reply.extend_from_slice(&query[0..2]); // id
    reply.extend_from_slice(&[0x81, 0x80]); // response, recursion desired and available, NOERROR
    reply.extend_from_slice(&[0, 1]); // one question
    reply.extend_from_slice(&[0, u8::from(matches)]); // answers
    reply.extend_from_slice(&[0, 0, 0, 0]); // no authority, no additional
    reply.extend_from_slice(question);
    if matches {
        reply.extend_from_slice(&[0xc0, 12]); // the name: a pointer to the question's
        reply.extend_from_slice(&TYPE_A.to_be_bytes());
        reply.extend_from_slice(&[0, 1]); // class IN
        reply.extend_from_slice(&TTL.to_be_bytes());
        reply.extend_from_slice(&[0, 4]);
        reply.extend_from_slice(&HOSTNAME_ADDR.octets());
    }
    Some(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        q
    }

    #[test]
    fn answers_the_hostname_with_its_address() {
        let q = query(HOSTNAME, TYPE_A);
        let r = answer(&q).expect("reply");
        assert_eq!(&r[0..2], &[0x12, 0x34]);
        assert_eq!(&r[6..8], &[0, 1], "one answer");
        assert_eq!(&r[r.len() - 4..], &[127, 0, 0, 3]);
    }

    #[test]
    fn other_names_and_types_get_no_answer() {
        for q in [query("other.test", TYPE_A), query(HOSTNAME, 28)] {
            let r = answer(&q).expect("reply");
            assert_eq!(&r[6..8], &[0, 0]);
            assert_eq!(r.len(), q.len());
        }
        assert!(answer(&[0; 5]).is_none());
    }
}
