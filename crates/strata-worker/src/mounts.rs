//! UFS handles for mounts, fetched from the master by mount id on first use.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use strata_proto::pb;
use strata_ufs::{Ufs, UfsError, UfsErrorKind, UfsUri};

pub struct Mounts {
    channel: tonic::transport::Channel,
    cache: Mutex<HashMap<u64, Ufs>>,
}

impl Mounts {
    pub fn new(channel: tonic::transport::Channel) -> Self {
        Mounts {
            channel,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub async fn get(&self, id: u64) -> Result<Ufs, UfsError> {
        if let Some(u) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return Ok(u.clone());
        }
        let mut c = pb::master_client::MasterClient::new(self.channel.clone());
        let m = c
            .get_mount(pb::MountIdRequest { id })
            .await
            .map_err(|s| {
                UfsError::new(
                    UfsErrorKind::Other,
                    format!("mount {id}"),
                    format!("cannot get the mount from the master: {}", s.message()),
                )
            })?
            .into_inner();
        let opts: BTreeMap<String, String> = m.options.into_iter().collect();
        let uri = UfsUri::parse(&m.ufs_uri, &opts)?;
        let u = strata_ufs::open(&uri)?;
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, u.clone());
        Ok(u)
    }
}
