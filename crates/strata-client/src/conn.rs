//! Data-protocol connections to workers, pooled per address.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::BytesMut;
use strata_proto::data::{Message, read_message_buf, write_message};
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::error::ClientError;

pub(crate) struct DataConn {
    pub addr: String,
    rd: BufReader<OwnedReadHalf>,
    wr: BufWriter<OwnedWriteHalf>,
    timeout: Duration,
    /// Receive buffer reused across frames.
    scratch: BytesMut,
}

impl DataConn {
    async fn connect(addr: &str, timeout: Duration) -> Result<DataConn, ClientError> {
        let sock = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Connection {
                addr: addr.to_string(),
                msg: "connect timed out after 5s".into(),
            })?
            .map_err(|e| ClientError::Connection {
                addr: addr.to_string(),
                msg: format!("connect failed: {e}"),
            })?;
        let _ = sock.set_nodelay(true);
        let (rd, wr) = sock.into_split();
        Ok(DataConn {
            addr: addr.to_string(),
            // Small: a frame header read should not pull payload bytes into
            // this buffer, which would cost them an extra copy.
            rd: BufReader::with_capacity(16 << 10, rd),
            wr: BufWriter::with_capacity(64 << 10, wr),
            timeout,
            scratch: BytesMut::new(),
        })
    }

    fn conn_err(&self, msg: impl std::fmt::Display) -> ClientError {
        ClientError::Connection {
            addr: self.addr.clone(),
            msg: msg.to_string(),
        }
    }

    pub async fn send(&mut self, m: &Message) -> Result<(), ClientError> {
        write_message(&mut self.wr, m)
            .await
            .map_err(|e| self.conn_err(e))
    }

    pub async fn flush(&mut self) -> Result<(), ClientError> {
        self.wr.flush().await.map_err(|e| self.conn_err(e))
    }

    pub async fn recv(&mut self) -> Result<Message, ClientError> {
        match tokio::time::timeout(
            self.timeout,
            read_message_buf(&mut self.rd, &mut self.scratch),
        )
        .await
        {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(e)) => Err(self.conn_err(e)),
            Err(_) => Err(self.conn_err(format!(
                "no answer within {}s (client.io_timeout_secs)",
                self.timeout.as_secs()
            ))),
        }
    }
}

/// Idle connections by worker address.
pub(crate) struct Pool {
    idle: Mutex<HashMap<String, Vec<DataConn>>>,
    timeout: Duration,
    /// Idle connections kept per worker; more are closed when returned.
    max_idle: usize,
}

impl Pool {
    pub fn new(timeout: Duration, max_idle: usize) -> Self {
        Pool {
            idle: Mutex::new(HashMap::new()),
            timeout,
            max_idle,
        }
    }

    pub async fn get(&self, addr: &str) -> Result<DataConn, ClientError> {
        let pooled = self
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(addr)
            .and_then(|v| v.pop());
        match pooled {
            Some(c) => Ok(c),
            None => DataConn::connect(addr, self.timeout).await,
        }
    }

    /// Returns a connection whose last exchange completed cleanly.
    pub fn put(&self, c: DataConn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let v = idle.entry(c.addr.clone()).or_default();
        if v.len() < self.max_idle {
            v.push(c);
        }
    }

    /// Forgets every idle connection to `addr` (after a failure).
    pub fn drop_addr(&self, addr: &str) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(addr);
    }
}
