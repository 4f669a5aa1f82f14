//! What the dimse integration tests share: [`Trickle`], the stream they
//! run the SCP over.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

/// A stream whose reads return at most `max` bytes at a time (1, or a
/// pseudo-random size from a fixed seed), so that every carry-over path of
/// the SCP's PDU reader runs, while its writes go through whole.
pub struct Trickle {
    inner: DuplexStream,
    max: usize,
    seed: u64,
}

impl Trickle {
    /// Reads of at most `max` bytes, sized from the default seed.
    pub fn new(inner: DuplexStream, max: usize) -> Self {
        Trickle::with_seed(inner, max, 0x9E37_79B9_7F4A_7C15)
    }

    /// Reads of at most `max` bytes, sized from `seed`.
    pub fn with_seed(inner: DuplexStream, max: usize, seed: u64) -> Self {
        Trickle { inner, max, seed }
    }

    fn next_len(&mut self) -> usize {
        if self.max == 1 {
            return 1;
        }
        // xorshift64: reproducible sizes without a dependency.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        1 + (self.seed as usize % self.max)
    }
}

impl AsyncRead for Trickle {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.next_len().min(buf.remaining());
        let mut limited = ReadBuf::new(buf.initialize_unfilled_to(n));
        match Pin::new(&mut self.inner).poll_read(cx, &mut limited) {
            Poll::Ready(Ok(())) => {
                let got = limited.filled().len();
                buf.advance(got);
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl AsyncWrite for Trickle {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
