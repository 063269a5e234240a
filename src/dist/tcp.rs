//! The rendezvous on MASTER_ADDR:MASTER_PORT and a host collective over TCP: a star through
//! rank 0. Rank 0 listens, every other rank connects and says hello (magic, protocol version,
//! rank, world size); rank 0 answers once all are there, or refuses a rank that does not fit
//! (wrong world size, a rank twice) so both sides get the same one-line error.
//!
//! Every operation is one round: each rank sends its part to rank 0, rank 0 combines the parts
//! in rank order (concatenates them, or sums them 0 + 1 + 2 …, so every rank gets the same bits)
//! and sends the result back. Frames are a tag byte, a little-endian u64 length and the payload;
//! f32 data travels as little-endian bytes.
//!
//! Failure: [`Collective::abort`] sends "rank r failed: why" to rank 0, which relays it to every
//! rank; a rank whose process ended shows as a closed socket, which rank 0 relays as
//! "rank r disconnected: its process ended". Every pending and later operation of every rank then
//! fails with that line. No operation waits on a dead peer (keepalive probes find a machine that
//! vanished within ~90 s); a live peer that never calls the operation is waited for, as in any
//! collective.
use super::launch::RankEnv;
use super::Collective;
use crate::error::{Error, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const MAGIC: [u8; 4] = *b"CFdp";
/// Bumped whenever the frames change: ranks of different versions refuse each other.
pub const PROTOCOL_VERSION: u32 = 1;

const HELLO: u8 = 1;
const WELCOME: u8 = 2;
const REFUSED: u8 = 3;
const PART: u8 = 4;
const RESULT: u8 = 5;
const ABORT: u8 = 6;

/// Largest frame a peer may announce (a garbage length must not allocate the machine away).
const MAX_FRAME: u64 = 1 << 40;

/// One connection to a peer: reads and writes are locked separately so `abort` can write while
/// another thread is blocked reading.
struct Link {
    rank: usize,
    read: Mutex<TcpStream>,
    write: Mutex<TcpStream>,
}

/// The TCP collective of one rank (see the module docs).
pub struct TcpGroup {
    rank: usize,
    world: usize,
    at: String,
    /// Rank 0: ranks 1..world in order; any other rank: rank 0.
    peers: Vec<Link>,
    /// The first failure seen; every later operation returns it.
    failed: Mutex<Option<String>>,
}

fn write_frame(s: &mut TcpStream, tag: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = tag;
    head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(payload)?;
    s.flush()
}

fn read_frame(s: &mut TcpStream, max: u64) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head)?;
    let mut len = [0u8; 8];
    len.copy_from_slice(&head[1..]);
    let len = u64::from_le_bytes(len);
    if len > max {
        return Err(std::io::Error::new(ErrorKind::InvalidData, format!("a frame of {len} bytes (not a clipforge rank?)")));
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload)?;
    Ok((head[0], payload))
}

/// A peer's socket failed: its process ended (closed, reset) or something else went wrong.
fn gone(rank: usize, e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            format!("rank {rank} disconnected: its process ended")
        }
        _ => format!("rank {rank} disconnected: {e}"),
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn hello(rank: usize, world: usize) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    for v in [PROTOCOL_VERSION, rank as u32, world as u32] {
        h.extend(v.to_le_bytes());
    }
    h
}

/// (version, rank, world) from a hello, or None when it is not one of ours.
fn parse_hello(tag: u8, p: &[u8]) -> Option<(u32, usize, usize)> {
    if tag != HELLO || p.len() != 16 || p[..4] != MAGIC {
        return None;
    }
    let word = |i: usize| u32::from_le_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
    Some((word(4), word(8) as usize, word(12) as usize))
}

/// TCP keepalive probes after 30 s of silence, every 10 s, 6 unanswered = dead: a peer whose
/// machine vanished (no FIN, no RST) fails the operation within ~90 s instead of never.
fn keepalive(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    let set = |level: i32, opt: i32, v: i32| {
        // SAFETY: setsockopt on a live socket with a pointer to an int of the size given.
        unsafe { libc::setsockopt(fd, level, opt, (&v as *const i32).cast(), std::mem::size_of::<i32>() as libc::socklen_t) };
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    #[cfg(target_os = "linux")]
    {
        set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 6);
    }
}

/// Where rank 0 listens: a loopback MASTER_ADDR as given (only this machine can reach it anyway);
/// any other address or a host name on every interface, as torchrun's store does (a host name
/// may resolve to an address other ranks cannot reach, e.g. Debian's 127.0.1.1).
fn listen_addr(addr: &str, port: u16) -> SocketAddr {
    match addr.trim_matches(['[', ']']).parse::<IpAddr>() {
        Ok(ip) if ip.is_loopback() => SocketAddr::new(ip, port),
        Ok(IpAddr::V6(_)) => SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), port),
        _ => SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), port),
    }
}

impl TcpGroup {
    /// Joins the job: rank 0 listens on MASTER_ADDR:MASTER_PORT and waits up to `timeout` for
    /// every other rank; the others retry connecting until `timeout`. Returns once all ranks are
    /// connected (the rendezvous is also a barrier).
    pub fn connect(env: &RankEnv, timeout: Duration) -> Result<TcpGroup> {
        if env.world == 0 || env.rank >= env.world {
            return Err(Error::msg(format!("rank {} of world {}: not a valid rank", env.rank, env.world)));
        }
        let at = format!("{}:{}", env.master_addr, env.master_port);
        let peers = if env.world == 1 {
            vec![]
        } else if env.rank == 0 {
            Self::accept_all(env, &at, timeout)?
        } else {
            vec![Self::join(env, &at, timeout)?]
        };
        Ok(TcpGroup { rank: env.rank, world: env.world, at, peers, failed: Mutex::new(None) })
    }

    fn link(rank: usize, s: TcpStream) -> Result<Link> {
        keepalive(&s);
        let w = s.try_clone().map_err(|e| Error::msg(format!("rank {rank}: {e}")))?;
        Ok(Link { rank, read: Mutex::new(s), write: Mutex::new(w) })
    }

    /// Rank 0's side of the rendezvous.
    fn accept_all(env: &RankEnv, at: &str, timeout: Duration) -> Result<Vec<Link>> {
        let bind = listen_addr(&env.master_addr, env.master_port);
        let listener = TcpListener::bind(bind)
            .map_err(|e| Error::msg(format!("rank 0 cannot listen on {bind} (MASTER_ADDR:MASTER_PORT {at}): {e}; is another job using MASTER_PORT?")))?;
        listener.set_nonblocking(true).map_err(|e| Error::msg(format!("listening on {bind}: {e}")))?;
        let deadline = Instant::now() + timeout;
        let mut slots: Vec<Option<(TcpStream, SocketAddr)>> = (0..env.world).map(|_| None).collect();
        let refuse_all = |slots: &mut Vec<Option<(TcpStream, SocketAddr)>>, why: &str| {
            for (s, _) in slots.iter_mut().flatten() {
                let _ = write_frame(s, REFUSED, why.as_bytes());
            }
        };
        while slots.iter().skip(1).any(|s| s.is_none()) {
            let (mut s, from) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                    if Instant::now() >= deadline {
                        let missing: Vec<String> = (1..env.world).filter(|&r| slots[r].is_none()).map(|r| r.to_string()).collect();
                        let why = format!(
                            "rank 0 waited {:.0} s on {at} for rank(s) {} of {}: start every rank with the same WORLD_SIZE, MASTER_ADDR and MASTER_PORT",
                            timeout.as_secs_f64(),
                            missing.join(", "),
                            env.world
                        );
                        refuse_all(&mut slots, &why);
                        return Err(Error::msg(why));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => return Err(Error::msg(format!("rank 0 accepting on {bind}: {e}"))),
            };
            // a connection that is not a clipforge rank (a port scan, a stale job) is dropped
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(200));
            if s.set_nonblocking(false).is_err() || s.set_read_timeout(Some(left.min(Duration::from_secs(10)))).is_err() {
                continue;
            }
            let Some((version, rank, world)) = read_frame(&mut s, 64).ok().and_then(|(t, p)| parse_hello(t, &p)) else {
                continue;
            };
            let why = if version != PROTOCOL_VERSION {
                Some(format!("rank {rank} speaks protocol version {version}, rank 0 version {PROTOCOL_VERSION}: run the same clipforge on every rank"))
            } else if world != env.world {
                Some(format!(
                    "rank {rank} (from {from}) says WORLD_SIZE={world} but rank 0 has WORLD_SIZE={}: start every rank with the same world size",
                    env.world
                ))
            } else if rank == 0 || rank >= env.world {
                Some(format!("a process at {from} says it is rank {rank}, but rank 0 is here and ranks run from 1 to {} for the others", env.world - 1))
            } else if let Some((_, first)) = &slots[rank] {
                Some(format!("two processes say they are rank {rank} ({first} and {from}): every rank needs its own RANK"))
            } else {
                None
            };
            if let Some(why) = why {
                let _ = write_frame(&mut s, REFUSED, why.as_bytes());
                refuse_all(&mut slots, &why);
                return Err(Error::msg(why));
            }
            slots[rank] = Some((s, from));
        }
        let mut links = Vec::with_capacity(env.world - 1);
        for (r, slot) in slots.into_iter().enumerate().skip(1) {
            let Some((mut s, _)) = slot else { continue };
            write_frame(&mut s, WELCOME, &[]).map_err(|e| Error::msg(gone(r, &e)))?;
            s.set_read_timeout(None).and_then(|_| s.set_nodelay(true)).map_err(|e| Error::msg(gone(r, &e)))?;
            links.push(Self::link(r, s)?);
        }
        Ok(links)
    }

    /// A non-zero rank's side: connect (retrying until `timeout`), hello, wait for the welcome.
    fn join(env: &RankEnv, at: &str, timeout: Duration) -> Result<Link> {
        let addrs: Vec<SocketAddr> = (env.master_addr.as_str(), env.master_port)
            .to_socket_addrs()
            .map_err(|e| Error::msg(format!("MASTER_ADDR={}: cannot resolve it: {e}", env.master_addr)))?
            .collect();
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no address");
        let mut s = 'found: loop {
            for a in &addrs {
                let left = deadline.saturating_duration_since(Instant::now()).clamp(Duration::from_millis(50), Duration::from_secs(2));
                match TcpStream::connect_timeout(a, left) {
                    Ok(s) => break 'found s,
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::msg(format!(
                    "rank {} could not reach rank 0 at {at} within {:.0} s ({last}): is rank 0 running, and MASTER_ADDR/MASTER_PORT the same on every rank?",
                    env.rank,
                    timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let io = |e: std::io::Error| Error::msg(format!("rank {} talking to rank 0 at {at}: {e}", env.rank));
        s.set_nodelay(true).map_err(io)?;
        write_frame(&mut s, HELLO, &hello(env.rank, env.world)).map_err(io)?;
        // rank 0 answers when every rank is there: wait as long as it may wait, and a little more
        let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
        s.set_read_timeout(Some(left)).map_err(io)?;
        match read_frame(&mut s, 1 << 16) {
            Ok((WELCOME, _)) => {}
            Ok((REFUSED, why)) => return Err(Error::msg(String::from_utf8_lossy(&why).into_owned())),
            Ok((t, _)) => return Err(Error::msg(format!("rank {}: rank 0 at {at} answered with frame {t} (not a clipforge rank 0?)", env.rank))),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                return Err(Error::msg(format!("rank {}: rank 0 at {at} did not complete the rendezvous within {:.0} s", env.rank, timeout.as_secs_f64())))
            }
            Err(e) => return Err(Error::msg(format!("rank {}: rank 0 at {at} closed the rendezvous ({})", env.rank, gone(0, &e)))),
        }
        s.set_read_timeout(None).map_err(io)?;
        Self::link(0, s)
    }

    /// Rank 0's `data` on every rank (rank 0 passes `Some`, the others `None`).
    pub fn broadcast_bytes(&self, data: Option<&[u8]>) -> Result<Vec<u8>> {
        match (self.rank, data) {
            (0, None) => return Err(Error::msg("broadcast_bytes: rank 0 must pass the data")),
            (r, Some(_)) if r > 0 => return Err(Error::msg(format!("broadcast_bytes: rank {r} passed data; only rank 0 does"))),
            _ => {}
        }
        self.round(data.unwrap_or(&[]), |mut parts| Ok(parts.swap_remove(0)))
    }

    /// The failure this rank has seen ("rank r failed: why", "rank r disconnected: …"), if any.
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().ok().and_then(|f| f.clone())
    }

    fn check(&self) -> Result<()> {
        match self.failed.lock().ok().and_then(|f| f.clone()) {
            Some(why) => Err(Error::msg(why)),
            None => Ok(()),
        }
    }

    /// Records the first failure; returns the one that stands.
    fn fail(&self, why: String) -> Error {
        let Ok(mut f) = self.failed.lock() else { return Error::msg(why) };
        Error::msg(f.get_or_insert(why).clone())
    }

    /// Rank 0: records `why` and tells every other rank.
    fn fail_all(&self, why: String) -> Error {
        let e = self.fail(why);
        let msg = e.message();
        for l in &self.peers {
            if let Ok(mut w) = l.write.lock() {
                let _ = write_frame(&mut w, ABORT, msg.as_bytes());
            }
        }
        e
    }

    /// Reads the next frame from `l`, expecting `tag`; an abort in its place is the failure.
    fn recv(&self, l: &Link, tag: u8) -> std::result::Result<Vec<u8>, String> {
        let got = l
            .read
            .lock()
            .map_err(|_| format!("rank {}: link poisoned", l.rank))
            .and_then(|mut s| read_frame(&mut s, MAX_FRAME).map_err(|e| gone(l.rank, &e)))?;
        match got {
            (t, p) if t == tag => Ok(p),
            (ABORT, why) => Err(String::from_utf8_lossy(&why).into_owned()),
            (t, _) => Err(format!("protocol error: rank {} sent frame {t} where frame {tag} was due (ranks calling different collectives?)", l.rank)),
        }
    }

    /// Writes a frame to `l`; when that fails, an abort the peer sent before it went away wins.
    fn send(&self, l: &Link, tag: u8, payload: &[u8]) -> std::result::Result<(), String> {
        let r = l
            .write
            .lock()
            .map_err(|_| format!("rank {}: link poisoned", l.rank))
            .and_then(|mut s| write_frame(&mut s, tag, payload).map_err(|e| gone(l.rank, &e)));
        r.map_err(|why| {
            let pending = l.read.try_lock().ok().and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
                match read_frame(&mut s, MAX_FRAME) {
                    Ok((ABORT, m)) => Some(String::from_utf8_lossy(&m).into_owned()),
                    _ => None,
                }
            });
            pending.unwrap_or(why)
        })
    }

    /// One collective round: every rank's `mine` to rank 0, `combine` of the parts (in rank
    /// order) back to every rank.
    fn round(&self, mine: &[u8], combine: impl FnOnce(Vec<Vec<u8>>) -> std::result::Result<Vec<u8>, String>) -> Result<Vec<u8>> {
        self.check()?;
        if self.world == 1 {
            return combine(vec![mine.to_vec()]).map_err(Error::msg);
        }
        if self.rank == 0 {
            let mut parts = Vec::with_capacity(self.world);
            parts.push(mine.to_vec());
            for l in &self.peers {
                parts.push(self.recv(l, PART).map_err(|why| self.fail_all(why))?);
            }
            let out = combine(parts).map_err(|why| self.fail_all(why))?;
            for l in &self.peers {
                self.send(l, RESULT, &out).map_err(|why| self.fail_all(why))?;
            }
            Ok(out)
        } else {
            let l = &self.peers[0];
            self.send(l, PART, mine).map_err(|why| self.fail(why))?;
            self.recv(l, RESULT).map_err(|why| self.fail(why))
        }
    }
}

/// The parts must all have `mine`'s length.
fn same_lengths(op: &str, parts: &[Vec<u8>]) -> std::result::Result<(), String> {
    let n = parts.first().map_or(0, |p| p.len());
    match parts.iter().position(|p| p.len() != n) {
        Some(r) => Err(format!("{op}: rank {r} sent {} values, rank 0 has {} (ranks out of step)", parts[r].len() / 4, n / 4)),
        None => Ok(()),
    }
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        let out = self.round(&f32_bytes(local), |parts| {
            same_lengths("all_gather", &parts)?;
            Ok(parts.concat())
        })?;
        Ok(bytes_f32(&out))
    }
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
        let out = self.round(&f32_bytes(data), |parts| {
            same_lengths("all_reduce_sum", &parts)?;
            let mut acc = bytes_f32(&parts[0]);
            for p in &parts[1..] {
                for (a, c) in acc.iter_mut().zip(p.chunks_exact(4)) {
                    *a += f32::from_le_bytes([c[0], c[1], c[2], c[3]]); // rank order: ((x0 + x1) + x2) …
                }
            }
            Ok(f32_bytes(&acc))
        })?;
        if out.len() != data.len() * 4 {
            return Err(self.fail(format!("all_reduce_sum: rank 0 sent back {} values for {}", out.len() / 4, data.len())));
        }
        data.copy_from_slice(&bytes_f32(&out));
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.round(&[], |_| Ok(vec![])).map(|_| ())
    }
    fn abort(&self, why: &str) {
        let msg = self.fail(format!("rank {} failed: {why}", self.rank)).message();
        for l in &self.peers {
            if let Ok(mut w) = l.write.lock() {
                let _ = write_frame(&mut w, ABORT, msg.as_bytes());
            }
        }
    }
    fn describe(&self) -> String {
        format!("tcp (rank {} of {}, a star through rank 0 at {})", self.rank, self.world, self.at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_rejects_strangers() {
        assert_eq!(parse_hello(HELLO, &hello(3, 8)), Some((PROTOCOL_VERSION, 3, 8)));
        assert_eq!(parse_hello(HELLO, b"GET / HTTP/1.1\r\n"), None);
        assert_eq!(parse_hello(PART, &hello(3, 8)), None);
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(listen_addr("127.0.0.1", 5), "127.0.0.1:5".parse().unwrap());
        assert_eq!(listen_addr("10.1.2.3", 5), "0.0.0.0:5".parse().unwrap());
        assert_eq!(listen_addr("node17", 5), "0.0.0.0:5".parse().unwrap());
        assert_eq!(listen_addr("[::1]", 5), "[::1]:5".parse().unwrap());
    }
}
