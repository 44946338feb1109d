//! Repairs the `:authority` of HTTP/2 requests on the Workload API socket before hyper sees them.
//!
//! gRPC clients built on grpc-core (grpcio, so py-spiffe; grpc-java too) send the unix socket's
//! percent-encoded path (`tmp%2Frun%2Fworkload.sock`) as `:authority`, which is no valid
//! authority; h2 refuses such a request with `RST_STREAM(PROTOCOL_ERROR)` and has no option to
//! accept it (hyperium/h2#487). A unix socket has no authority anyway: the client's header
//! blocks are decoded (HPACK) and each sent on re-encoded, an invalid `:authority` replaced by
//! `localhost`; every other frame passes unchanged. The re-encoding uses literals without
//! indexing, so it adds nothing to the server's HPACK table.

use std::io;

use hyper::http::uri::Authority;
use loona_hpack::Decoder;
use loona_hpack::encoder::encode_integer_into;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

/// What hyper advertises (its SETTINGS_MAX_FRAME_SIZE default): re-encoded blocks are cut to it.
const MAX_OUT_FRAME: usize = 16_384;
/// The largest frame a client may send (RFC 9113 §4.2: 2^24 - 1); hyper refuses what exceeds
/// its own setting after this.
const MAX_IN_FRAME: usize = (1 << 24) - 1;
/// A header block larger than this (over several CONTINUATION frames) ends the connection.
const MAX_HEADER_BLOCK: usize = 64 * 1024;
const PREFACE_LEN: usize = 24;

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Puts the repair between `client` and the returned stream, which hyper then serves.
pub(crate) fn repaired<S>(client: S) -> DuplexStream
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (mut client_r, mut client_w) = tokio::io::split(client);
    let (mut ours_r, mut ours_w) = tokio::io::split(ours);
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut ours_r, &mut client_w).await;
        let _ = client_w.shutdown().await;
    });
    tokio::spawn(async move {
        let _ = pump(&mut client_r, &mut ours_w).await;
        let _ = ours_w.shutdown().await;
    });
    theirs
}

/// A header block being gathered: its stream, its END_STREAM flag, its fragments so far.
struct Block {
    stream: u32,
    end_stream: u8,
    bytes: Vec<u8>,
}

async fn pump<R, W>(r: &mut R, w: &mut W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; PREFACE_LEN];
    r.read_exact(&mut preface).await?;
    w.write_all(&preface).await?;
    let mut decoder = Decoder::new();
    let mut block: Option<Block> = None;
    loop {
        let mut head = [0u8; 9];
        r.read_exact(&mut head).await?;
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if len > MAX_IN_FRAME {
            return Err(invalid("frame too large"));
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await?;
        match (kind, block.as_mut()) {
            (HEADERS, None) => {
                let fragment = headers_fragment(&payload, flags)?;
                let gathered = Block {
                    stream,
                    end_stream: flags & END_STREAM,
                    bytes: fragment.to_vec(),
                };
                if flags & END_HEADERS != 0 {
                    emit(w, &mut decoder, &gathered).await?;
                } else {
                    block = Some(gathered);
                }
            }
            (CONTINUATION, Some(open)) if open.stream == stream => {
                open.bytes.extend_from_slice(&payload);
                if open.bytes.len() > MAX_HEADER_BLOCK {
                    return Err(invalid("header block too large"));
                }
                if flags & END_HEADERS != 0
                    && let Some(done) = block.take()
                {
                    emit(w, &mut decoder, &done).await?;
                }
            }
            // A frame between a HEADERS and its CONTINUATION, or a CONTINUATION out of place:
            // a connection error either way (RFC 9113 §6.10).
            (_, Some(_)) | (CONTINUATION, None) => return Err(invalid("misplaced frame")),
            (_, None) => {
                w.write_all(&head).await?;
                w.write_all(&payload).await?;
            }
        }
    }
}

/// The header block fragment of a HEADERS frame, without padding and priority fields.
fn headers_fragment(payload: &[u8], flags: u8) -> io::Result<&[u8]> {
    let mut fragment = payload;
    if flags & PADDED != 0 {
        let (&pad, rest) = fragment.split_first().ok_or_else(|| invalid("padding"))?;
        let keep = rest
            .len()
            .checked_sub(usize::from(pad))
            .ok_or_else(|| invalid("padding"))?;
        fragment = &rest[..keep];
    }
    if flags & PRIORITY != 0 {
        fragment = fragment.get(5..).ok_or_else(|| invalid("priority"))?;
    }
    Ok(fragment)
}

/// Decodes `block`, repairs its authority, and writes it as HEADERS (+ CONTINUATION) frames.
async fn emit<W: AsyncWrite + Unpin>(
    w: &mut W,
    decoder: &mut Decoder<'_>,
    block: &Block,
) -> io::Result<()> {
    let headers = decoder
        .decode(&block.bytes)
        .map_err(|e| invalid(&format!("HPACK: {e:?}")))?;
    let encoded = encode(&repair(headers));
    let chunks: Vec<&[u8]> = if encoded.is_empty() {
        vec![&[]]
    } else {
        encoded.chunks(MAX_OUT_FRAME).collect()
    };
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        let mut flags = if i == last { END_HEADERS } else { 0 };
        if i == 0 {
            flags |= block.end_stream;
        }
        let len = chunk.len();
        let mut head = [0u8; 9];
        head[0] = (len >> 16) as u8;
        head[1] = (len >> 8) as u8;
        head[2] = len as u8;
        head[3] = kind;
        head[4] = flags;
        head[5..9].copy_from_slice(&block.stream.to_be_bytes());
        w.write_all(&head).await?;
        w.write_all(chunk).await?;
    }
    Ok(())
}

/// An `:authority` that is no authority (a socket path) becomes `localhost`.
fn repair(mut headers: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<(Vec<u8>, Vec<u8>)> {
    for (name, value) in &mut headers {
        if name.as_slice() == b":authority" && Authority::try_from(value.as_slice()).is_err() {
            *value = b"localhost".to_vec();
        }
    }
    headers
}

/// Every field as a literal without indexing, new name (RFC 7541 §6.2.2), no Huffman.
fn encode(headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.push(0);
        for s in [name, value] {
            // Writing into a Vec cannot fail.
            let _ = encode_integer_into(s.len(), 7, 0, &mut out);
            out.extend_from_slice(s);
        }
    }
    out
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("HTTP/2 {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(h: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        h.iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn a_socket_path_authority_becomes_localhost_and_the_rest_survives() {
        let sent = owned(&[
            (":method", "POST"),
            (":authority", "tmp%2Frun%2Fworkload.sock"),
            (":path", "/SpiffeWorkloadAPI/FetchJWTSVID"),
            ("workload.spiffe.io", "true"),
        ]);
        // What a client's encoder (with its dynamic table and Huffman) would send.
        let wire = loona_hpack::Encoder::new()
            .encode(sent.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let decoded = Decoder::new().decode(&wire).expect("decodes");
        let again = Decoder::new()
            .decode(&encode(&repair(decoded)))
            .expect("re-encoded block decodes");
        let mut want = sent.clone();
        want[1].1 = b"localhost".to_vec();
        assert_eq!(again, want);
    }

    #[test]
    fn a_valid_authority_is_kept() {
        let h = owned(&[(":authority", "localhost:8080")]);
        assert_eq!(repair(h.clone()), h);
    }

    #[tokio::test]
    async fn frames_pass_and_header_blocks_are_reframed() {
        let block = encode(&owned(&[(":authority", "a%2Fb"), ("x", "y")]));
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // SETTINGS (empty), then HEADERS split over a CONTINUATION, padded.
        input.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        let (a, b) = block.split_at(3);
        let len = a.len() + 1 + 2;
        input.extend_from_slice(&[0, 0, len as u8, HEADERS, PADDED | END_STREAM, 0, 0, 0, 1, 2]);
        input.extend_from_slice(a);
        input.extend_from_slice(&[0, 0]);
        input.extend_from_slice(&[0, 0, b.len() as u8, CONTINUATION, END_HEADERS, 0, 0, 0, 1]);
        input.extend_from_slice(b);
        let mut out = Vec::new();
        let err = pump(&mut input.as_slice(), &mut out)
            .await
            .expect_err("ends at EOF");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(
            &out[..24 + 9],
            &input[..24 + 9],
            "preface and SETTINGS unchanged"
        );
        let frame = &out[24 + 9..];
        assert_eq!(frame[3], HEADERS);
        assert_eq!(frame[4], END_HEADERS | END_STREAM);
        let len = usize::from(frame[2]);
        let got = Decoder::new().decode(&frame[9..9 + len]).expect("decodes");
        assert_eq!(got, owned(&[(":authority", "localhost"), ("x", "y")]));
    }
}
