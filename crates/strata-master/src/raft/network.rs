//! Raft messages between masters over gRPC: the `RaftTransport` service
//! carries openraft's own request and response types, postcard-encoded.

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, BasicNode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use strata_proto::pb::{self, raft_transport_client::RaftTransportClient};
use tonic::transport::Channel;

use super::{Raft, TypeConfig};

/// Dials other masters; one lazily connected channel per peer.
pub struct Network;

pub struct Peer {
    target: u64,
    node: BasicNode,
    client: Option<RaftTransportClient<Channel>>,
}

pub use strata_proto::masters::channel;

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Peer {
        let client = channel(&node.addr).ok().map(|ch| {
            RaftTransportClient::new(ch)
                .max_decoding_message_size(512 << 20)
                .max_encoding_message_size(512 << 20)
        });
        Peer {
            target,
            node: node.clone(),
            client,
        }
    }
}

type RpcErr<E = openraft::error::Infallible> = RPCError<u64, BasicNode, RaftError<u64, E>>;

impl Peer {
    async fn call<Req, Resp, E>(
        &mut self,
        req: &Req,
        option: &RPCOption,
        which: &'static str,
    ) -> Result<Resp, RpcErr<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let Some(client) = self.client.as_mut() else {
            let e = AnyError::error(format!("invalid address {:?}", self.node.addr));
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        };
        let data =
            postcard::to_allocvec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(pb::RaftBytes { data });
        request.set_timeout(option.hard_ttl());
        let r = match which {
            "append" => client.append_entries(request).await,
            "vote" => client.vote(request).await,
            _ => client.install_snapshot(request).await,
        };
        let reply = match r {
            Ok(r) => r.into_inner(),
            Err(s) => {
                let e =
                    AnyError::error(format!("master {} at {}: {s}", self.target, self.node.addr));
                return Err(match s.code() {
                    tonic::Code::Unavailable | tonic::Code::Cancelled => {
                        RPCError::Unreachable(Unreachable::new(&e))
                    }
                    _ => RPCError::Network(NetworkError::new(&e)),
                });
            }
        };
        let r: Result<Resp, RaftError<u64, E>> = postcard::from_bytes(&reply.data)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        r.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                e,
            ))
        })
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RpcErr> {
        self.call(&rpc, &option, "append").await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RpcErr<InstallSnapshotError>> {
        self.call(&rpc, &option, "snapshot").await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RpcErr> {
        self.call(&rpc, &option, "vote").await
    }
}

/// A read-index stream on which no ask came for this long is ended (its
/// follower asks every millisecond while it serves reads).
const READ_INDEX_STREAM_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

/// The server side: decodes a message, hands it to the local Raft node and
/// encodes its answer (errors included, so the sender sees Raft's own error).
pub struct Transport {
    pub raft: Raft,
    pub reads: std::sync::Arc<super::ReadIndex>,
}

fn decode<T: DeserializeOwned>(r: tonic::Request<pb::RaftBytes>) -> Result<T, tonic::Status> {
    postcard::from_bytes(&r.into_inner().data)
        .map_err(|e| tonic::Status::invalid_argument(format!("undecodable Raft message: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<tonic::Response<pb::RaftBytes>, tonic::Status> {
    postcard::to_allocvec(v)
        .map(|data| tonic::Response::new(pb::RaftBytes { data }))
        .map_err(|e| tonic::Status::internal(format!("cannot encode Raft reply: {e}")))
}

#[tonic::async_trait]
impl pb::raft_transport_server::RaftTransport for Transport {
    async fn append_entries(
        &self,
        r: tonic::Request<pb::RaftBytes>,
    ) -> Result<tonic::Response<pb::RaftBytes>, tonic::Status> {
        let req: AppendEntriesRequest<TypeConfig> = decode(r)?;
        let resp = self.raft.append_entries(req).await;
        if matches!(resp, Ok(AppendEntriesResponse::Success)) {
            self.reads.leader_contact();
        }
        encode(&resp)
    }

    async fn vote(
        &self,
        r: tonic::Request<pb::RaftBytes>,
    ) -> Result<tonic::Response<pb::RaftBytes>, tonic::Status> {
        let req: VoteRequest<u64> = decode(r)?;
        // A leader (or one that has just stepped down, or restarted) may
        // give its vote to a candidate at once: openraft refuses votes for
        // the election timeout only while the vote it holds is a leader's
        // it heard from. Its vote can decide the election, so the read
        // leases it granted are withdrawn (or run out) first, or a holder
        // could answer from its state while the new leader already commits
        // writes; none is granted until the vote is cast.
        let _no_leases = self.reads.leases.quiesce().await;
        encode(&self.raft.vote(req).await)
    }

    async fn install_snapshot(
        &self,
        r: tonic::Request<pb::RaftBytes>,
    ) -> Result<tonic::Response<pb::RaftBytes>, tonic::Status> {
        let req: InstallSnapshotRequest<TypeConfig> = decode(r)?;
        encode(&self.raft.install_snapshot(req).await)
    }

    async fn read_index(
        &self,
        _r: tonic::Request<pb::Empty>,
    ) -> Result<tonic::Response<pb::ReadIndexResponse>, tonic::Status> {
        let index = self.reads.leader_read_index(&self.raft).await?;
        Ok(tonic::Response::new(pb::ReadIndexResponse {
            index,
            ..Default::default()
        }))
    }

    type ReadIndexStreamStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::ReadIndexResponse, tonic::Status>>;

    async fn read_index_stream(
        &self,
        r: tonic::Request<tonic::Streaming<pb::ReadIndexAsk>>,
    ) -> Result<tonic::Response<Self::ReadIndexStreamStream>, tonic::Status> {
        let (raft, reads) = (self.raft.clone(), self.reads.clone());
        let stream = reads.leases.stream();
        // Answers, and lease withdrawals sent by writes (which hold only a
        // weak sender: the stream ends when this task does).
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut asks = r.into_inner();
        let mut server = raft.server_metrics();
        // Each ask is answered after it arrived, in order. The stream ends
        // after the first failure (not the leader), when this master stops
        // leading or shuts down, and when nothing came for a while (a
        // follower that became leader or went away): an open stream must
        // not keep a former leader's connections, or its shutdown, waiting.
        tokio::spawn(async move {
            use futures::StreamExt;
            loop {
                if server.borrow().state != openraft::ServerState::Leader {
                    break;
                }
                let next = tokio::select! {
                    next = tokio::time::timeout(READ_INDEX_STREAM_IDLE, asks.next()) => next,
                    changed = server.changed() => match changed {
                        Ok(()) => continue,
                        Err(_) => break,
                    },
                };
                let Ok(Some(Ok(ask))) = next else { break };
                if ask.given_back > 0 {
                    reads.leases.given_back(stream, ask.given_back);
                }
                if ask.seq == 0 {
                    continue;
                }
                let answer = reads
                    .answer(&raft, stream, &ask, tx.downgrade())
                    .await
                    .map_err(tonic::Status::from);
                let failed = answer.is_err();
                if tx.send(answer).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
    }
}
